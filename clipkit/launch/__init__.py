"""Launching runs the way a cluster user does.

    clipkit-launch slurm --nodes 4 --gpus-per-node 8 --time 72:00:00 --partition P --account A -- experiment=...
    clipkit-launch slurm --eval --gpus-per-node 8 --partition P -- run_dir=outputs/my_run
    clipkit-launch local --nproc 2 -- experiment=demo_digits
    clipkit-train -m hydra/launcher=clipkit_slurm loss=clip,siglip       # a sweep: one job per point

`sbatch` renders launch/slurm/*.sbatch into a run's own job script and submits it (long,
multi-node runs that checkpoint, requeue and resume); `sweep` names and checks the points of a
Hydra multirun, which the hydra-submitit-launcher plugin submits as one job each (short runs).
`cli` is the `clipkit-launch` command. Every path checks the composed config on the login
node first, with `clipkit-train`'s one-line errors.
"""
