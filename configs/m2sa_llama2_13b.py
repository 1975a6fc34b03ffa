"""M²SA-Llama2-13B: the MMR paper's recipe on a LLaMA-2-13B-chat LLaVA (paper §5.1, Table 2).

    python train.py --config configs/m2sa_llama2_13b.py --workdir runs/m2sa_13b \\
        --config.model.llava_checkpoint=converted/llava-llama-2-13b-chat-lightning-preview \\
        --config.model.sam_checkpoint=converted/sam_vit_h --config.data.root=/data/m2sa

Everything is configs/m2sa_7b.py's recipe (see its docstring for where each value comes from)
except the language model:

* LLaVA on LLaMA-2-13B-chat (llava-llama-2-13b-chat-lightning-preview): d 5120, FFN 13824,
  40 layers × 40 heads, 4096 positions, RMSNorm eps 1e-5 (its config.json)      [paper, code]
* the paper reports about 52 h on 4 × A6000 for this model (40 h for 7B)        [paper]
* mesh / remat: the memory plan (docs/training.md) needs fsdp over every device [plan]
"""

from m2sa_jax.config_file import sibling

m2sa_7b = sibling(__file__, "m2sa_7b")


def get_config(arg: str | None = None):
    c = m2sa_7b.get_config(arg)
    c.workdir = "runs/m2sa_llama2_13b"
    c.model.llm = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, head_dim=128,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       scan_layers=True, remat_policy="nothing_saveable")
    return c
