"""What training needs beside the models: the Real-ESRGAN degradation that makes LR inputs, and the LPIPS network used
as a perceptual loss (and by the metrics)."""
