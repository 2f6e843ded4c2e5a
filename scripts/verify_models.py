#!/usr/bin/env python3
"""Verify fwdtrans on third-party models (timm CNNs and attention models, Hugging Face transformers).

Usage (from the repository root, with timm and/or transformers installed)::

    python scripts/verify_models.py [--models resnet18,vit_tiny ...] [--json results.json] [--timeout 120]

Every model is built from a config with random weights (no download), small, in float64. For each one:

1. train mode with dropout / drop-path probabilities 0; one train forward so running statistics are not
   initial; snapshot of the state dict;
2. ``fwdtrans.convert(model, x, blocks=4, heads="linear")`` (warnings recorded; a ``FwdTransError`` is the
   result);
3. the model's state dict unchanged and ``converted.original_state_dict()`` equal to it;
4. eval mode: ``max |converted(x) - model(x)|``;
5. train mode: ``convert(..., guess="global").compute_gradients(x, y)`` against autograd of
   ``F.cross_entropy(model(x), y)`` on a fresh copy of the model (relative error per parameter);
6. ``fwdtrans.check`` of the activity-space and of the weight-space conversions;
7. the cut names and each block's share of the forward FLOPs.

Each model runs in its own subprocess (a crash or a hang is recorded, not fatal). Models whose library is
not importable are skipped with a message. Hugging Face models are wrapped in a module whose
``forward(input_ids)`` returns ``.logits`` (fwdtrans takes tensors, not ``ModelOutput``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import fwdtrans  # noqa: E402

CLASSES = 5
BATCH = 4
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def _timm(name: str, size: int = 32, leaf=None, deploy: bool = False, **kwargs):
    def build():
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
        if deploy:  # RepVGG-style branches fused into one convolution (timm's inference form)
            from timm.utils.model import reparameterize_model
            with torch.no_grad():
                model.train()(torch.randn(BATCH, 3, size, size))  # statistics to fuse that are not initial
            model = reparameterize_model(model.eval())
        return model, torch.randn(BATCH, 3, size, size, dtype=torch.float64)
    return ("timm", build, leaf)


def _mixer(resmlp: bool = False):
    """timm's ``mixer_s16_224`` / ``resmlp_12_224`` fix patch size and widths: build their class, small."""
    def build():
        from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
        kwargs = dict(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4) if resmlp else {}
        model = MlpMixer(num_classes=CLASSES, img_size=32, patch_size=8, embed_dim=32, num_blocks=4,
                         drop_rate=0.0, drop_path_rate=0.0, **kwargs)
        return model, torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    return ("timm", build, None)


class LogitsOnly(nn.Module):
    """``forward(input_ids)`` -> ``model(input_ids).logits``: fwdtrans needs a model that returns logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids).logits


def _hf(config_name: str, model_name: str, leaf=None, **config):
    def build():
        import transformers
        cfg = getattr(transformers, config_name)(num_labels=CLASSES, **config)
        model = LogitsOnly(getattr(transformers, model_name)(cfg))
        return model, torch.randint(0, 100, (BATCH, 16))
    return ("transformers", build, leaf)


def _leaf(module: str, *names: str):
    """``leaf_modules=`` for convert: classes kept whole (their forward needs concrete shapes)."""
    def classes():
        import importlib
        owner = importlib.import_module(module)
        return [getattr(owner, n) for n in names]
    return classes


DROP = dict(drop_rate=0.0, drop_path_rate=0.0)
MODELS = {
    "resnet10t": _timm("resnet10t", **DROP),
    "resnet18": _timm("resnet18", **DROP),
    "efficientnet_b0": _timm("efficientnet_b0", **DROP),
    "tf_efficientnet_lite0": _timm("tf_efficientnet_lite0", **DROP),
    "tf_efficientnet_lite0+leaf": _timm("tf_efficientnet_lite0", leaf=_leaf("timm.layers", "Conv2dSame"), **DROP),
    "mobilenetv3_small_100": _timm("mobilenetv3_small_100", **DROP),
    "mobilenetv2_050": _timm("mobilenetv2_050", **DROP),
    "regnetx_002": _timm("regnetx_002", **DROP),
    "densenet121": _timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2), drop_rate=0.0),
    "repvgg_a0": _timm("repvgg_a0", **DROP),
    "repvgg_a0+deploy": _timm("repvgg_a0", deploy=True, **DROP),
    "ghostnet_050": _timm("ghostnet_050", drop_rate=0.0),
    "inception_v3": _timm("inception_v3", size=75, drop_rate=0.0),
    "inception_next_atto": _timm("inception_next_atto", **DROP),
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", **VIT, **DROP),
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224", **VIT, **DROP),
    "mixer_s16_224": _mixer(),
    "convnext_atto": _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **DROP),
    "resmlp_12_224": _mixer(resmlp=True),
    "bert": _hf("BertConfig", "BertForSequenceClassification", vocab_size=100, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "bert+leaf": _hf("BertConfig", "BertForSequenceClassification", vocab_size=100, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     leaf=_leaf("transformers.models.bert.modeling_bert", "BertEmbeddings", "BertSelfAttention")),
    "distilbert": _hf("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=100, dim=32,
                      n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32, dropout=0.0,
                      attention_dropout=0.0, seq_classif_dropout=0.0),
    "gpt2": _hf("GPT2Config", "GPT2ForSequenceClassification", vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0),
}


def _states_equal(a: dict, b: dict) -> tuple[bool, str]:
    if set(a) != set(b):
        return False, f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            return False, f"{k} differs"
    return True, ""


def _convert(model, x, result, key, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fwdtrans.convert(model, x, blocks=4, heads="linear", leaf_modules=LEAF, **kwargs)
    messages = sorted({str(w.message) for w in caught if "jit.script" not in str(w.message)})  # timm's own
    if messages:
        result.setdefault("warnings", {})[key] = messages
    return converted


LEAF: list = []  # leaf_modules of the model being verified


def run_one(name: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result: dict = {"model": name}
    stage = "build"
    try:
        _, build, leaf = MODELS[name]
        model, x = build()
        if leaf is not None:
            LEAF[:] = leaf()
            result["leaf_modules"] = [c.__name__ for c in LEAF]
        model = model.double().train()
        y = torch.randint(0, CLASSES, (BATCH,))
        result["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            model(x)  # running statistics no longer initial
        state = {k: v.clone() for k, v in model.state_dict().items()}

        stage = "convert"
        t0 = time.time()
        converted = _convert(model, x, result, "activity")
        result["convert_s"] = round(time.time() - t0, 2)
        result["converts"] = True
        result["cuts"] = list(converted.cut_names)
        try:
            plan = fwdtrans.inspect(model, x, blocks=4, heads="linear", leaf_modules=LEAF).plan
            total = sum(r["flops"] for r in plan) or 1
            result["flop_share"] = [round(r["flops"] / total, 3) for r in plan]
        except Exception as e:  # noqa: BLE001
            result["flop_share"] = f"inspect failed: {type(e).__name__}: {e}"

        stage = "buffers"
        same_model, why_model = _states_equal(state, model.state_dict())
        same_conv, why_conv = _states_equal(state, converted.original_state_dict())
        result["buffers_untouched"] = same_model and same_conv
        if not result["buffers_untouched"]:
            result["buffers_note"] = f"model: {why_model or 'same'}; original_state_dict: {why_conv or 'same'}"

        stage = "eval"
        model.eval()
        converted.eval()
        with torch.no_grad():
            result["eval_max_abs"] = (converted(x) - model(x)).abs().max().item()
        same_after, why_after = _states_equal(state, converted.original_state_dict())
        if not same_after:
            result["eval_note"] = f"original_state_dict changed by an eval forward: {why_after}"

        stage = "backprop"
        model.train()
        converted.train()
        reference = copy.deepcopy(model).train()
        converted2 = _convert(model, x, result, "global", guess="global")
        converted2.train()
        converted2.compute_gradients(x, y)
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        worst, worst_name, missing = 0.0, "", []
        num = den = 0.0
        seen = set()
        compared = 0
        for n, p in converted2.named_parameters():
            if not n.startswith("blocks."):
                continue
            on = converted2.original_name(n)
            seen.add(on)
            if on not in ref:
                continue
            if p.grad is None:
                missing.append(on)
                continue
            d = (p.grad - ref[on]).norm().item()
            r = d / max(ref[on].norm().item(), 1e-300)
            num, den = num + d * d, den + ref[on].norm().item() ** 2
            compared += 1
            if r > worst:
                worst, worst_name = r, on
        missing += [n for n in ref if n not in seen and ref[n].abs().max() > 0]
        result["backprop_rel_err"] = worst
        result["backprop_worst"] = worst_name
        result["backprop_compared"] = f"{compared} of {len(ref)} parameters with a gradient"
        result["backprop_rel_err_total"] = (num / max(den, 1e-300)) ** 0.5
        if missing:
            result["backprop_missing"] = missing[:10]

        stage = "check activity"
        report = fwdtrans.check(converted, (x, y))
        result["check_activity"] = report.ok
        result["check_activity_text"] = str(report)
        stage = "check weight"
        converted_w = _convert(model, x, result, "weight", space="weight")
        converted_w.train()
        report = fwdtrans.check(converted_w, (x, y))
        result["check_weight"] = report.ok
        result["check_weight_text"] = str(report)
        stage = "done"
    except Exception as e:  # noqa: BLE001
        result["error_stage"] = stage
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-3000:]
    if stage == "convert" and "converts" not in result:
        result["converts"] = False
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from: " + ", ".join(MODELS))
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0

    results = []
    for name in args.models.split(","):
        library = MODELS[name][0]
        try:
            __import__(library)
        except ImportError as e:
            print(f"{name}: skipped ({library} not importable: {e})")
            results.append({"model": name, "skipped": f"{library} not importable"})
            continue
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=args.timeout, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"model": name, "error": "no result: "
                                                          + proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"model": name, "error": f"timed out after {args.timeout:.0f} s"}
        result["seconds"] = round(time.time() - t0, 1)
        results.append(result)
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if 'text' not in k and k != 'traceback'})}",
              flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print("| model | converts | eval equal | buffers untouched | backprop rel err | check activity | check weight "
          "| notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        def cell(key, fmt="{}", r=r):
            return fmt.format(r[key]) if key in r else "-"
        notes = [r["skipped"]] if "skipped" in r else []
        notes += [f"leaf_modules={r['leaf_modules']}"] if "leaf_modules" in r else []
        notes += [f"{r.get('error_stage', '')}: {r['error'].splitlines()[0][:160]}"] if "error" in r else []
        print(f"| {r['model']} | {cell('converts')} | {cell('eval_max_abs', '{:.1e}')} | {cell('buffers_untouched')} "
              f"| {cell('backprop_rel_err', '{:.1e}')} | {cell('check_activity')} | {cell('check_weight')} "
              f"| {'; '.join(notes)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
