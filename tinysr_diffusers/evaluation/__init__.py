"""Measuring models: image-quality metrics (pyiqa, offline), parameter/MAC/FLOP counting, and the paper's reference
architecture configs that the figures are computed on."""
