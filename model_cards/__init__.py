"""Hub model-card templates (`string.Template` markdown, one per kind of card), installed with the toolkit as package
data and filled by `tinysr_diffusers.hub.model_cards`. See `README.md` in this folder."""
