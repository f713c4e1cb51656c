"""The one-off measurement behind run 33's note on the per-step module walk: the time of
`trainer.multilora.vanilla_lora_layers` over a reference-shaped Qwen2 (hidden 896, 24
layers) carrying 8 LoRA adapters (r=16 on q, k, v, o), as a group of 8 holds it. Before
commit 2c361ba every compiled group step made this walk.

    python bench/results/2026-12-07-run33/module_walk.py
"""

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.multilora import vanilla_lora_layers

warnings.simplefilter("ignore")  # peft on several adapters in one model
cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=1000)
lora = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
peft = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(**lora), adapter_name="a0")
for i in range(1, 8):
    peft.add_adapter(f"a{i}", LoraConfig(**lora))
print("modules", sum(1 for _ in peft.modules()))
for _ in range(3):
    vanilla_lora_layers(peft, [])
n, t0 = 50, time.perf_counter()
for _ in range(n):
    vanilla_lora_layers(peft, [])
print(f"one walk: {(time.perf_counter() - t0) / n * 1e3:.2f} ms")
