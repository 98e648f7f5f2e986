"""Post-training: chat format, SFT, LoRA, DPO, GRPO, and people in the loop.

    chat.py      the chat template: special tokens, a conversation -> (ids, loss mask) in one pass
    data.py      JSONL readers (chat, preference, prompt records), fitting, packing, batches
    sft.py       the SFT objective: masked cross-entropy
    lora.py      LoRA adapters on Linear-like layers; merge / unmerge / disabled; adapter-only state
    logprobs.py  token and sequence log-probs: a masked log-softmax gather with its own backward
    dpo.py       the DPO loss (a pure function of log-probs), pairs, the cached reference
    grpo.py      group-relative policy gradient with a verifiable reward
    task.py      the built-in task: values of small Python expressions, with a held-out split
    stage.py     one stage (sft / dpo / grpo) on the shared Trainer; loading adapter checkpoints
    compare.py   `tinylm chat` and `tinylm compare` (human preferences in the DPO format)
    cli.py       the subcommands
"""
