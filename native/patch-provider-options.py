#!/usr/bin/env python3
"""Patches onnxruntime's js/node/src/session_options_helper.cc so an execution-provider object's `providerOptions`
({"trt_fp16_enable": "1", ...}, ORT's C API option keys) reach Update{TensorRT,CUDA}ProviderOptions. The stock
binding passes only deviceId. Every anchor must occur exactly once, else the file is left untouched and this exits 1
(the source changed: build with --no-patch, or adapt the anchors). Idempotent: a patched file is left as it is.

Usage: patch-provider-options.py path/to/session_options_helper.cc
"""
import sys

MARK = "// edgelora: forward providerOptions"

DECLS = """    std::vector<std::string> edgeloraOptionKeys;  // edgelora: forward providerOptions
    std::vector<std::string> edgeloraOptionValues;
"""

COLLECT = """      if (obj.Has("providerOptions") && obj.Get("providerOptions").IsObject()) {  // edgelora: forward providerOptions
        Napi::Object providerOptions = obj.Get("providerOptions").As<Napi::Object>();
        Napi::Array optionNames = providerOptions.GetPropertyNames();
        // Update*ProviderOptions rebuilds the whole struct from the keys it is given, so device_id goes first.
        edgeloraOptionKeys.push_back("device_id");
        edgeloraOptionValues.push_back(std::to_string(deviceId));
        for (uint32_t k = 0; k < optionNames.Length(); k++) {
          Napi::Value optionName = optionNames[k];
          Napi::Value optionValue = providerOptions.Get(optionName);
          edgeloraOptionKeys.push_back(optionName.ToString().Utf8Value());
          edgeloraOptionValues.push_back(optionValue.ToString().Utf8Value());
        }
      }
"""


def update_call(fn: str) -> str:
    return f"""      if (!edgeloraOptionKeys.empty()) {{  // edgelora: forward providerOptions
        std::vector<const char*> keys, values;
        for (size_t k = 0; k < edgeloraOptionKeys.size(); k++) {{
          keys.push_back(edgeloraOptionKeys[k].c_str());
          values.push_back(edgeloraOptionValues[k].c_str());
        }}
        Ort::ThrowOnError(Ort::GetApi().{fn}(options, keys.data(), values.data(), keys.size()));
      }}
"""


# (anchor, replacement): each anchor is kept and the new code goes after (or between) its lines.
EDITS = [
    ("#include <unordered_map>\n", "#include <unordered_map>\n#include <string>\n#include <vector>\n"),
    ("    int deviceId = 0;\n", "    int deviceId = 0;\n" + DECLS),
    (
        '      if (obj.Has("deviceId")) {\n        deviceId = obj.Get("deviceId").As<Napi::Number>();\n      }\n',
        '      if (obj.Has("deviceId")) {\n        deviceId = obj.Get("deviceId").As<Napi::Number>();\n      }\n' + COLLECT,
    ),
    (
        "      options->device_id = deviceId;\n      sessionOptions.AppendExecutionProvider_CUDA_V2(*options);\n",
        "      options->device_id = deviceId;\n" + update_call("UpdateCUDAProviderOptions") + "      sessionOptions.AppendExecutionProvider_CUDA_V2(*options);\n",
    ),
    (
        "      options->device_id = deviceId;\n      sessionOptions.AppendExecutionProvider_TensorRT_V2(*options);\n",
        "      options->device_id = deviceId;\n" + update_call("UpdateTensorRTProviderOptions") + "      sessionOptions.AppendExecutionProvider_TensorRT_V2(*options);\n",
    ),
]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if MARK in text:
        print(f"{path}: already patched")
        return 0
    for anchor, _ in EDITS:
        n = text.count(anchor)
        if n != 1:
            first = anchor.strip().splitlines()[0]
            print(f"{path}: expected exactly one '{first}' but found {n}; not patching (use --no-patch)", file=sys.stderr)
            return 1
    for anchor, replacement in EDITS:
        text = text.replace(anchor, replacement, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{path}: patched ({len(EDITS)} edits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
