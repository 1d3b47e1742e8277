"""Post-training quantization (RTN, GPTQ), torchao int8 / QAT on CPU, and 2:4 sparsity of tp = 1 models.

    quantize_checkpoint(ckpt, out, method, bits, group_size)   -> a quantized checkpoint directory + report
    load_quantized(dir)                                        -> (Decoder, ModelConfig) rebuilt from the integers
"""
from megaseek.quant.store import load_quantized, read_quantized, write_checkpoint  # noqa: F401
from megaseek.quant.api import quantize_checkpoint  # noqa: F401
