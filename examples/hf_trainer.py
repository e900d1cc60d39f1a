"""DropGrad and clipping inside a Hugging Face ``Trainer`` run (tiny BERT built from a config, no download).

One process, or two CPU processes (DDP, the DropGrad communication hook):

    python examples/hf_trainer.py --output_dir /tmp/hf_one
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output_dir /tmp/hf_ddp

``split_batches`` makes ``--batch_size`` the global batch that the processes split, so both
commands step on the same batches and end with the same parameters. Writes ``params.safetensors``
and ``result.json`` (the log history and the steps DropGrad took) into ``--output_dir``.
"""

import argparse
import json
import os

import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from dropgrad_dist import enable_fsdp_on_cpu
from dropgrad_dist.integrations.transformers import add_regularizers


class ToyClassification(torch.utils.data.Dataset):
    """Token sequences whose label is whether token 7 occurs: made here, nothing downloaded."""

    def __init__(self, size: int, length: int = 16, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.input_ids = torch.randint(0, vocab, (size, length), generator=generator)
        self.labels = (self.input_ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones_like(self.input_ids[index]),
                "labels": self.labels[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="global batch, split over the processes")
    parser.add_argument("--drop_rate", type=float, default=0.5)
    parser.add_argument("--communication", choices=["dense", "compact"], default="compact")
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 (on CPU processes too)")
    parser.add_argument("--clip_level", type=float, default=0.5, help="clip the global norm to this (0: no clipping)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        accelerator_config={"split_batches": True}, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, ddp_find_unused_parameters=False,
        logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0,
        # BERT's classification loss is a mean over the batch, not a sum over num_items_in_batch:
        # Trainer's token averaging would scale it by the number of processes.
        average_tokens_across_devices=False,
        **(dict(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
           if args.fsdp2 else {}))
    trainer = Trainer(model=model, args=training, train_dataset=ToyClassification(8 * args.batch_size))
    if args.fsdp2 and trainer.accelerator.device.type == "cpu" and trainer.accelerator.num_processes > 1:
        # Accelerate shards only on GPU-like devices and otherwise falls back to DDP: shard on CPU too.
        enable_fsdp_on_cpu(trainer.accelerator, FullyShardedDataParallelPlugin(**training.fsdp_plugin_args))
        trainer.is_fsdp_enabled = True
    callback = add_regularizers(
        trainer, dropgrad=dict(drop_rate=args.drop_rate, seed=3, communication=args.communication),
        clipping=dict(method="norm", clipping_level=args.clip_level) if args.clip_level > 0 else None)
    trainer.train()  # max_grad_norm stays at Trainer's default: with clipping=, ours clips instead

    # FSDP2 parameters are DTensors: every rank takes part in gathering them.
    trained = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
              for name, p in trained.named_parameters()}
    if trainer.accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_file(params, os.path.join(args.output_dir, "params.safetensors"))
        result = {"mode": callback.regularizers.mode, "step_index": callback.regularizers.step_index,
                  "world_size": trainer.accelerator.num_processes, "log_history": trainer.state.log_history}
        with open(os.path.join(args.output_dir, "result.json"), "w") as file:
            json.dump(result, file)
        print(json.dumps(result["log_history"][-2]))


if __name__ == "__main__":
    main()
