"""Training and inference pipelines: configuration and recipes, data sets, batch augmentation, the trainer,
evaluation, prediction, checkpoints, distributed set-up, EMA, the learning-rate schedule and metrics logging.

May import ops, layers and models; needs the ``[train]`` extra (scikit-learn, kornia, matplotlib, pillow, tqdm,
pyyaml), so nothing imports it from ``import mpvg_kernels``.
"""
