"""Learning (layer 3): plans and planning, networks, preprocessing, cache, sampling, losses, trainer,
DDP, inference. torch and MONAI are imported here and nowhere else."""
