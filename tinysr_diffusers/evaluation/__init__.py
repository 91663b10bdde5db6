"""Measuring models: image-quality metrics (pyiqa, offline) and the scoring of image files with them,
parameter/MAC/FLOP counting and the CPU a timing ran on, and the paper's reference architecture configs that the
figures are computed on."""
