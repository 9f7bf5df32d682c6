"""Training stages: LoRA SFT shared by alignment and the harmful fine-tuning attack.

Modules: `data` (where training triples come from, formatting, tokenization: the public API defenses use),
`hooks` (`TrainingHooks`, how a training-stage defense plugs into a stage), `sft` (the loss and the Trainer),
`stages` (`antidote align` and `antidote finetune`), `config` (the training options).
"""
