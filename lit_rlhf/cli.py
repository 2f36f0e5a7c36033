"""The ``lit-rlhf`` console script: one LightningCLI per stage, plus the whole pipeline."""

from __future__ import annotations

import importlib
import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

# Dataclass fields (GenerationOptions, LoraOptions, ...) document themselves in `--help` through their docstrings.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# stage -> (LightningModule, LightningDataModule, module argument that names the tokenizer the data must use)
STAGE_CLIS: dict[str, tuple[str, str, str]] = {
    "sft": ("lit_rlhf.sft:SFTModule", "lit_rlhf.data.sft:SFTDataModule", "model.model"),
    "reward": ("lit_rlhf.reward:RewardModelModule", "lit_rlhf.data.preferences:PreferenceDataModule", "model.backbone"),
    "rl": ("lit_rlhf.rl.module:RLHFModule", "lit_rlhf.data.prompts:PromptDataModule", "model.policy"),
    "dpo": ("lit_rlhf.dpo:DPOModule", "lit_rlhf.data.preferences:PreferenceDataModule", "model.model"),
    "ilql": ("lit_rlhf.ilql:ILQLModule", "lit_rlhf.data.scored:ScoredDataModule", "model.model"),
}
# stage -> data module defaults that differ from the class's own (a recipe or the command line can still set them)
STAGE_DATA_DEFAULTS: dict[str, dict[str, object]] = {"dpo": {"data.encoding": "causal_lm"}}
OTHER_COMMANDS = {
    "pipeline": "lit_rlhf.pipeline:main",
    "export": "lit_rlhf.cli:export_main",
    "best-of-n": "lit_rlhf.cli:best_of_n_main",
}

USAGE = """usage: lit-rlhf STAGE SUBCOMMAND [--config FILE] [options]

stages (LightningCLI; SUBCOMMAND is fit, validate, test or predict):
  sft        supervised fine-tuning           lit-rlhf sft fit --config recipes/sft/smollm2.yaml
  reward     Bradley-Terry reward model       lit-rlhf reward fit --config recipes/reward/minilm_hh.yaml
  rl         PPO / A2C / NLPO / GRPO / RLOO / REINFORCE++ fine-tuning
                                              lit-rlhf rl fit --config recipes/rl/ppo_smollm2.yaml
  dpo        DPO / IPO / cDPO / SimPO on preference pairs
                                              lit-rlhf dpo fit --config recipes/dpo/smollm2_hh.yaml
  ilql       offline RL on scored responses   lit-rlhf ilql fit --config recipes/ilql/smollm2.yaml
other commands:
  pipeline   collect -> reward model -> RL -> evaluate -> report
             lit-rlhf pipeline --config recipes/pipeline/demo.yaml
  export     a Lightning checkpoint of a stage -> plain transformers folder (LoRA merged; an RL critic in critic/)
             lit-rlhf export rl outputs/rl/ppo_fsdp_8gpu/.../last.ckpt outputs/rl/ppo_fsdp_8gpu/hf
  best-of-n  n samples per prompt, the one the reward scores highest kept -> JSON lines
             lit-rlhf best-of-n --policy tiny-llama --reward lit_rlhf.rewards.LengthReward --n 8 --output bon.jsonl

`lit-rlhf STAGE --help` lists every option; `--print_config` prints the full configuration.
"""


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class StageCLI(LightningCLI):
    """LightningCLI that derives the data module's tokenizer from the model it feeds."""

    def __init__(self, *args, tokenizer_source: str, data_defaults: dict | None = None, **kwargs) -> None:
        self.tokenizer_source, self.data_defaults = tokenizer_source, data_defaults or {}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(self.tokenizer_source, "data.tokenizer")
        if self.data_defaults:
            parser.set_defaults(self.data_defaults)


def run_stage(stage: str, args: list[str] | None = None, run: bool = True) -> StageCLI:
    """Build (and by default run) the LightningCLI of one stage; ``args`` as on the command line after the stage."""
    if stage not in STAGE_CLIS:
        raise SystemExit(f"lit-rlhf: unknown stage {stage!r}; choose one of {', '.join(STAGE_CLIS)}.\n\n{USAGE}")
    model_path, data_path, source = STAGE_CLIS[stage]
    return StageCLI(
        _load(model_path),
        _load(data_path),
        tokenizer_source=source,
        data_defaults=STAGE_DATA_DEFAULTS.get(stage),
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": f"lit-rlhf {stage}"} if run else {"prog": f"lit-rlhf {stage}", "exit_on_error": False},
    )


def export_main(argv: list[str]) -> None:
    """``lit-rlhf export STAGE CKPT OUT``: rebuild the stage's module from a checkpoint on the CPU and save its model
    with ``export`` (how an FSDP run, whose ranks each hold a shard, gets a plain transformers checkpoint)."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="lit-rlhf export", description=export_main.__doc__)
    parser.add_argument("stage", choices=list(STAGE_CLIS))
    parser.add_argument("checkpoint", help="a .ckpt file (FSDP: state_dict_type full, or a consolidated one)")
    parser.add_argument("output", help="folder to write the transformers checkpoint and tokenizer to")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        raise SystemExit(
            f"lit-rlhf export: {checkpoint} is a sharded FSDP checkpoint folder. Consolidate it first with\n"
            f"  python -m lightning.pytorch.utilities.consolidate_checkpoint {checkpoint}\n"
            f"and export the file it writes ({checkpoint}.consolidated)."
        )
    module = _load(STAGE_CLIS[args.stage][0]).load_from_checkpoint(checkpoint, map_location="cpu")
    print(module.export(args.output))


def best_of_n_main(argv: list[str]) -> None:
    """``lit-rlhf best-of-n --policy P --reward R --prompts FILE --n 8 --output FILE``: the arguments of
    ``lit_rlhf.rl.best_of_n.run_best_of_n``, from the command line or a ``--config`` YAML (``--print_config``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lit_rlhf.rl.best_of_n import run_best_of_n

    parser = ArgumentParser(prog="lit-rlhf best-of-n", description=run_best_of_n.__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of the options below.")
    parser.add_function_arguments(run_best_of_n, fail_untyped=True)
    init = parser.instantiate_classes(parser.parse_args(argv))
    summary = run_best_of_n(**{key: value for key, value in vars(init).items() if key not in ("config", "__path__")})
    print(
        f"lit-rlhf best-of-n: {summary['prompts']} prompts × {summary['n']} candidates -> {summary['output']}; mean "
        f"score of the kept completions {summary['mean_best_score']:.4g} (of all candidates "
        f"{summary['mean_candidate_score']:.4g}); KL to the policy log n − (n − 1)/n = {summary['kl']:.4f} nats"
    )


def main(argv: list[str] | None = None) -> None:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in OTHER_COMMANDS:
        _load(OTHER_COMMANDS[command])(rest)
        return
    if from_console:
        # From the console script: LightningCLI reads the stage's arguments from sys.argv itself (it warns when
        # handed both), so drop the stage word there.
        sys.argv = [f"{sys.argv[0]} {command}", *rest]
        run_stage(command, None)
        return
    run_stage(command, rest)


if __name__ == "__main__":
    main()
