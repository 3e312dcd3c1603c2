# Device check: Hugging Face transformers + PEFT (real external programs) reproduce edgelora's
# logits for the same checkpoints and adapters; the tokenizer and chat template agree; and, where
# this machine's onnxruntime has a CUDA provider, our fused graph runs there and matches our CPU run.
import json, os, sys, time, traceback
import numpy as np

out = os.environ.get("OUT", ".")
report = {"checks": []}

def rel(a, b):
    a = np.asarray(a, np.float64); b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)), float(np.abs(a - b).max())

def record(name, ok, **kw):
    report["checks"].append({"name": name, "ok": bool(ok), **kw})
    print(("PASS " if ok else "FAIL ") + name + " " + json.dumps(kw), flush=True)

exp = json.load(open(".device-check/expected.json"))
try:
    import torch, transformers, peft
    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(report["versions"], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    report["device"] = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    TOL = 1e-4
    for case in exp["cases"]:
        try:
            model = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).to(dev).eval()
            if case["adapter"]:
                model = PeftModel.from_pretrained(model, case["adapter"]).to(dev).eval()
            ids = torch.tensor([case["ids"]], device=dev)
            with torch.no_grad():
                logits = model(ids).logits[0].float().cpu().numpy()
            ours = np.asarray(case["logits"], np.float32).reshape(logits.shape)
            r, m = rel(logits, ours)
            record("logits " + case["label"], r < TOL, rel=r, max_abs=m, tol=TOL, shape=list(logits.shape))
        except Exception as e:
            record("logits " + case["label"], False, error=repr(e)[:500])
            traceback.print_exc()
    try:
        tok = AutoTokenizer.from_pretrained(exp["cases"][0]["hf"])
        ids = tok(exp["prompt"])["input_ids"]
        record("tokenizer ids", ids == exp["ids"], ours=exp["ids"][:12], theirs=ids[:12], n_ours=len(exp["ids"]), n_theirs=len(ids))
        if exp.get("chat") is not None:
            chat = tok.apply_chat_template(exp["messages"], tokenize=False, add_generation_prompt=False)
            record("chat template", chat == exp["chat"], ours=exp["chat"][:120], theirs=chat[:120])
    except Exception as e:
        record("tokenizer", False, error=repr(e)[:500])
        traceback.print_exc()
except Exception as e:
    record("torch/transformers/peft import", False, error=repr(e)[:500])

try:
    import onnxruntime as ort
    prov = ort.get_available_providers()
    report["onnxruntime"] = {"version": ort.__version__, "providers": prov}
    print(report["onnxruntime"], flush=True)
    cases = json.load(open(".device-check/ort-cases.json"))
    for c in cases:
        for p in [x for x in ["CUDAExecutionProvider", "CPUExecutionProvider"] if x in prov]:
            try:
                so = ort.SessionOptions()
                s = ort.InferenceSession(os.path.join(c["model"], "model.onnx"), so, providers=[p])
                dt = {"float32": np.float32, "int64": np.int64, "int32": np.int32}
                feeds = {k: np.asarray(v["data"], dt[v["type"]]).reshape(v["dims"]) for k, v in c["feeds"].items() if k in {i.name for i in s.get_inputs()}}
                t0 = time.time()
                logits = s.run(["logits"], feeds)[0]
                ours = np.asarray(c["logits"], np.float32).reshape(logits.shape)
                r, m = rel(logits, ours)
                tol = 3e-2 if c["format"] == "int4" else 1e-4
                record(f"onnxruntime {p} {c['format']} fused graph vs edgelora CPU", r < tol, rel=r, max_abs=m, tol=tol, providers=s.get_providers(), ms=round((time.time() - t0) * 1000, 1))
            except Exception as e:
                record(f"onnxruntime {p} {c['format']}", False, error=repr(e)[:800])
except Exception as e:
    record("onnxruntime import", False, error=repr(e)[:300])

json.dump(report, open(os.path.join(out, "device-check.json"), "w"), indent=1)
print("SUMMARY", sum(c["ok"] for c in report["checks"]), "of", len(report["checks"]), "passed")
