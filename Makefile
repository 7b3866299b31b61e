# Two commands a new machine needs (see README):  make demo   and   make test
# Both create .venv when missing and install the project into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NPROC  ?= 2

# Offline-safe defaults for tests and the demo (no W&B login, no HF hub, DeepSpeed on CPU, a
# project-local extension cache instead of the machine-wide one).
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install demo test lint fashion-mnist clean gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package when apt is available; otherwise bavq downloads it
# (torchvision) on first use.
fashion-mnist:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y dataset-fashion-mnist || { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; } \
	  || echo "apt could not install dataset-fashion-mnist; bavq will download Fashion-MNIST instead"; \
	fi

# The main job: Fashion-MNIST -> WebDataset shards -> 2-process training (CPU: gloo) -> metrics table.
demo: install fashion-mnist
	$(BIN)/bavq-prep write --source fashion_mnist --output data/fmnist_shards --samples_per_shard 5000
	rm -rf experiments/demo_ba_vq  # the demo always starts over (train.resume=none refuses old checkpoints)
	$(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) --num_machines 1 --mixed_precision no \
	  --dynamo_backend no -m bavq.train --config configs/demo.yaml --name demo_ba_vq --no_wandb train.resume=none

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra tests

# Wheels for what the lent GPU machine lacks (Python 3.12 there, no network), carried as .whl/ to
# `bash benchmarks/gpu_smoke.sh` (DeepSpeed ships only a source archive: built here as a pure wheel).
GPU_PY := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: --no-deps
gpu-wheels: install
	mkdir -p .whl
	$(BIN)/pip download -q $(GPU_PY) -d .whl omegaconf==2.4.0 PyYAML webdataset==1.0.2 braceexpand \
	  hjson py-cpuinfo msgpack ninja einops
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	du -sh .whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .torch_extensions
