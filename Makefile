# make demo | make test | make bench — each creates .venv on first use.
# torch comes from this machine's local wheels: torch 2.14.1 + torchvision 0.29.1 is the pair
# that lets timm (the test peer) import with no workaround (see shared/reference/environment.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-export bench daformer-ablation venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The main job: a reduced Swin (swin_demo) on scikit-learn's bundled 8x8 digits, upscaled to 16 px.
DEMO_MODEL ?= swin_demo
demo: $(STAMP)
	$(BIN)/formers train $(DEMO_MODEL) --dataset digits --epochs 40 --batch-size 32 --lr 2e-3 \
		--warmup-epochs 2 --img-size 16 --threads 1 --out runs/demo $(DEMO_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 $(TEST_ARGS)

# the slow checks: ONNX export of every family against eager at two sizes, and torch.compile training
# (about 12 minutes on 2 cores)
test-export: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -m slow tests/test_onnx_families.py tests/test_trace_windows.py \
		tests/test_trace_sparse.py tests/test_trace_tokens.py tests/train/test_precision.py $(TEST_ARGS)

bench: $(STAMP)
	$(BIN)/formers bench swin_tiny_patch4_window7_224 poolformer_s12 convformer_s18 caformer_s18 \
		--peer timm --out runs/bench/bench.csv $(BENCH_ARGS)

# DAFormer's training components one by one on the mosaic (reduced scale; about 20 minutes on 2 cores)
daformer-ablation: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m formers.bench.daformer_ablation --out runs/daformer-ablation $(ABLATION_ARGS)

clean:
	rm -rf $(VENV) runs
