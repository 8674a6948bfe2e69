"""Names and limits shared by the compose modules."""

ADAPTER_PREFIX = "lora"  # apply_loras names the adapters lora0, lora1, ...
MERGE_RECORD = "mindone_lora_merge.json"  # written at the root of a merged model folder
# pickled or foreign weight files; left out of a merged component because they would still hold the unmerged weights
_STALE_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb",
                          ".bin.index.json", ".msgpack.index.json", ".h5.index.json")
_PATH_LIKE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".json")
