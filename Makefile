# clipjob: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLIPJOB := $(PY) -m clipjob
DEMO_DATA ?= data/emoji
DEMO_RUN  ?= runs/demo
# The demo trains on every emoji style but Twemoji, plus font glyphs (and named icons and symbols for tiny-cpu-lit),
# and leaves Twemoji out (README: leave-one-style-out table). DEMO_PRESET=tiny-cpu-lit (the default since session 18):
# the ImageNet-trained EfficientNet-Lite0, frozen, under a trained head, 500 steps (~9-10 min of training on 2
# cores); tiny-cpu: a conv-stem ViT trained from scratch, as many steps as fit (~12 min). Six of the styles come from
# npm (fetched once into ~/.cache/clipjob); without npm the demo trains on OpenMoji and glyphs only.
comma := ,
NPM_STYLES := fluent$(comma)emojione$(comma)emojione-v1$(comma)emojione-mono$(comma)fxemoji$(comma)streamline
# tiny-cpu-lit also trains on the named icons and symbols, 2 samples per concept (~9,000 concept names instead of
# ~1,500: held-out concepts gained 2.6 and 5.2 points of top-1 in the leave-one-style-out check, README); the
# from-scratch tiny-cpu does not (they diluted the emoji pictures there)
DEMO_NAMED ?= $(if $(filter tiny-cpu-lit,$(DEMO_PRESET)),$(comma)icons$(comma)symbols)
DEMO_STYLES ?= twemoji$(comma)openmoji$(comma)$(if $(shell command -v npm 2>/dev/null),$(NPM_STYLES)$(comma))glyph$(DEMO_NAMED)
DEMO_LEAVE_OUT ?= twemoji
DEMO_PRESET ?= tiny-cpu-lit
# tiny-cpu-lit trains its fixed 500 steps (541-583 s on the AVX2 EPYC with the icons): its first steps fill the
# feature cache and run several times slower than the rest, and train.budget_minutes would plan the run from them
# (then move the learning-rate schedule when it re-plans) where the measured schedule fits anyway
DEMO_BUDGET ?= $(if $(filter tiny-cpu-lit,$(DEMO_PRESET)),0,1)
# With DEMO_BUDGET=1 (tiny-cpu) the demo fits in DEMO_MINUTES from the moment `make demo` starts (install
# included): training gets what is left after the install and the data build, less DEMO_EVAL_RESERVE_S for the eval
# and the report (tiny-cpu's three checkpoints, four eval sets with retrieval and the plot took 41-69 s at 64 px,
# the trainer's start and last save ~10 s more), as train.budget_minutes (tiny-cpu asks for up to 1,800 steps of
# 256; each CPU runs what fits: more with bf16 on AMX or AVX512-BF16, about 1,250 in fp32 on an AVX2-only EPYC).
# tiny-cpu-lit ignores both: its fixed 500 steps and the eval of its two checkpoints fit on both CPUs.
DEMO_MINUTES ?= 15
DEMO_EVAL_RESERVE_S ?= 90
DEMO_T0 := $(shell date +%s)
# torch/torchvision: the builds that lie on these machines' disk (a CUDA build that runs on the CPU)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv venv-dev lock tools demo test test-fast bench smoke-container smoke-container-clean clean

# Installs go through uv, put into the venv by pip: the same pins from PyPI, measured on a 2-core AVX2 EPYC with an
# empty uv cache at ~50 s for torch's CUDA build and the rest, where pip took 2-2.5 min (README). Where uv cannot be
# installed or an install through it fails, pip makes the same install.
# Every install takes its versions from constraints.txt (the set the suite last passed with; `make lock` rewrites it
# from a fresh resolve), so a registry's new release cannot change what CI or the demo runs. CONSTRAINTS= installs
# unpinned.
CONSTRAINTS ?= constraints.txt
UV := $(VENV)/bin/uv
pinned = $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(1)
install = { test -x $(UV) && $(UV) pip install -q -p $(PY) $(pinned); } || $(PY) -m pip install -q $(pinned)

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q uv > /dev/null 2>&1 || echo "note: uv could not be installed; pip installs instead (slower)"
	@echo "venv: installing $(TORCH_PINS) and clipjob[emoji,minilm,effnet] into $(VENV)$$(test -x $(UV) && echo ' with uv')"
	@$(call install,$(TORCH_PINS))
	@$(call install,-e '.[emoji$(comma)minilm$(comma)effnet]')
	@touch $@

venv-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml $(CONSTRAINTS)
	@echo "venv: installing clipjob[dev] (test and bench tools) into $(VENV)"
	@$(call install,-e '.[dev]')
	@touch $@

# constraints.txt anew: clipjob[dev] resolved without it in a scratch venv, then every version it got. Run the suite
# on the result before committing it.
LOCK_VENV ?= .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) --no-print-directory venv-dev VENV=$(LOCK_VENV) CONSTRAINTS=
	$(LOCK_VENV)/bin/python scripts/write_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "lock: constraints.txt has $$(grep -c == constraints.txt) pins; git diff constraints.txt shows what moved"

tools: venv-dev
	PYTHON=$(PY) bash scripts/install_tools.sh

demo: venv
	@echo "demo: venv ready $$(( $$(date +%s) - $(DEMO_T0) )) s after make started"
	@rm -rf $(DEMO_RUN)
	@start=$$(date +%s); \
	case "$(DEMO_STYLES)" in *fluent*) ;; *) echo "note: npm not found, so the demo trains on OpenMoji and glyphs only, without the six npm emoji sets (lower unseen-style accuracy than the README's)";; esac; \
	$(CLIPJOB) data emoji --out $(DEMO_DATA) --styles $(DEMO_STYLES) --leave-out $(DEMO_LEAVE_OUT) \
		--named-captions-per-concept 2 && \
	budget=$$($(PY) -c "print(round(max(1.0, ($(DEMO_MINUTES) * 60 - ($$(date +%s) - $(DEMO_T0)) - $(DEMO_EVAL_RESERVE_S)) / 60), 2))") && \
	echo "demo: $$budget of $(DEMO_MINUTES) minutes left for training$(if $(filter 1,$(DEMO_BUDGET)), (train.budget_minutes), ($(DEMO_PRESET) trains its fixed train.steps))" && \
	$(CLIPJOB) train --preset $(DEMO_PRESET) --set data.train=$(DEMO_DATA) \
		$(if $(filter 1,$(DEMO_BUDGET)),--set train.budget_minutes=$$budget) --run-dir $(DEMO_RUN) && \
	$(CLIPJOB) eval zeroshot --watch $(DEMO_RUN) --max-polls 1 --retrieval --data emoji-heldout:$(DEMO_DATA) \
		--data emoji-heldout-styles:$(DEMO_DATA) --data emoji-heldout:$(DEMO_DATA)/unseen \
		--data emoji-seen:$(DEMO_DATA)/unseen && \
	$(CLIPJOB) report $(DEMO_RUN) && \
	echo "demo finished in $$(( $$(date +%s) - start )) s, $$(( $$(date +%s) - $(DEMO_T0) )) s since make started (report: $(DEMO_RUN)/report.png)"

test: tools
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: venv-dev
	$(PY) -m pytest -q -x tests/unit

bench: venv-dev
	$(PY) bench/run.py
	$(PY) bench/ckpt_bench.py --no-s3

smoke-container: venv-dev
	bash scripts/smoke_container.sh

smoke-container-clean:
	bash scripts/smoke_container.sh clean

clean:
	rm -rf $(VENV) .lock-venv .tools runs data
