"""Training only the top of a transformer: finding its stack of layers, freezing what lies below the top ``N`` of
them, and the LoRA targets inside those ``N`` (``models.train_top_layers`` puts these together)."""

from __future__ import annotations

import re

from torch import nn


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the list of ``model``'s transformer layers (``model.layers`` of a Llama, ``bert.encoder.layer``
    of BERT or MiniLM, ``transformer.h`` of GPT-2 ...), bottom first.

    It is the one ``nn.ModuleList`` whose entries are transformers' ``GradientCheckpointingLayer``, the class every
    decoder and encoder layer derives from, and the unit of FSDP wrapping and activation checkpointing here too
    (``scale.FSDPStrategy``, ``rl.policy.checkpoint_decoder_layers``).

    Raises:
        ValueError: ``model`` has no such list, or several (an encoder-decoder model).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(isinstance(layer, GradientCheckpointingLayer) for layer in module)
    ]
    if len(stacks) != 1:
        found = ", ".join(name for name, _ in stacks) or "none"
        raise ValueError(
            f"trainable_layers needs one stack of transformer layers, but {type(model).__name__} has {len(stacks)} "
            f"({found}); set trainable_layers to null to train every layer."
        )
    return stacks[0]


def check_trainable_layers(
    trainable_layers: int | None, num_layers: int | None = None, prefix: str = "", where: str = "the model"
) -> None:
    """Fail unless ``trainable_layers`` is None or between 1 and ``num_layers`` (when known); the error names the
    option ``{prefix}trainable_layers`` and, with ``num_layers``, the model ``where`` it counted them."""
    if trainable_layers is None:
        return
    if num_layers is None and trainable_layers < 1:
        raise ValueError(
            f"{prefix}trainable_layers must be >= 1 (or null to train every layer), got {trainable_layers}."
        )
    if num_layers is not None and not 1 <= trainable_layers <= num_layers:
        raise ValueError(
            f"{prefix}trainable_layers must be between 1 and {num_layers}, the number of layers of {where}, or null "
            f"to train every layer; got {trainable_layers}."
        )


def _stack_and_first(model: nn.Module, trainable_layers: int) -> tuple[str, nn.ModuleList, int]:
    """The layer stack and the index of its lowest trained layer, after checking ``trainable_layers`` against it."""
    name, stack = layer_stack(model)
    check_trainable_layers(trainable_layers, len(stack), where=f"{type(model).__name__} ({name})")
    return name, stack, len(stack) - trainable_layers


def freeze_below(model: nn.Module, trainable_layers: int) -> None:
    """Freeze (``requires_grad`` False) every weight of ``model`` below its top ``trainable_layers`` layers.

    Below means the lower layers and every weight registered before the stack (the embeddings); the top layers and
    what is registered after the stack (the final norm, a pooler, the LM or score head) keep training. A head tied to
    the input embedding (SmolLM2, GPT-2) is the same tensor as that embedding and stays frozen: training it would mean
    training the bottom of the network, and the backward pass would then run through every frozen layer to reach it,
    the cost freezing is there to save. Weights already frozen stay frozen.

    ``trainable_layers`` equal to the number of layers freezes nothing, the embeddings included: the backward pass
    reaches them anyway, and "all layers" then means what None (the default) means.
    """
    _, stack, first = _stack_and_first(model, trainable_layers)
    if first == 0:
        return
    trained = {id(p) for layer in stack[first:] for p in layer.parameters()}
    in_stack = {id(p) for p in stack.parameters()}
    past_embeddings = False
    for parameter in model.parameters():  # registration order; a tied head comes once, where its embedding is
        if id(parameter) in in_stack:
            past_embeddings = True
            if id(parameter) not in trained:
                parameter.requires_grad_(False)
        elif not past_embeddings:
            parameter.requires_grad_(False)


def _picks(target_modules: list[str] | str, name: str, module: nn.Module) -> bool:
    """Whether peft would put an adapter on ``module`` (full name ``name``) for this ``target_modules``."""
    if target_modules == "all-linear":
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, (nn.Linear, Conv1D))  # bitsandbytes' 8- and 4-bit layers are nn.Linear too
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in target_modules)


def top_layer_targets(model: nn.Module, target_modules: list[str] | str, trainable_layers: int) -> list[str] | str:
    """The full names of the modules in the top ``trainable_layers`` layers of ``model`` that LoRA's
    ``target_modules`` picks, matched as peft matches them: ``all-linear`` every linear layer, another string a
    regular expression the whole name must match, a list the names equal to or ending in one of its entries.

    peft's own ``layers_to_transform`` refuses a string ``target_modules`` (``all-linear`` included), so the names
    are listed instead; peft then adapts exactly these modules. With every layer trained, ``target_modules`` comes
    back as it is (the same as None: a module outside the layers, such as BERT's pooler, keeps its adapter).

    Raises:
        ValueError: ``target_modules`` picks nothing in those layers.
    """
    name, stack, first = _stack_and_first(model, trainable_layers)
    if first == 0:
        return target_modules
    targets = [
        f"{name}.{index}.{sub}"
        for index in range(first, len(stack))
        for sub, module in stack[index].named_modules()
        if sub and _picks(target_modules, f"{name}.{index}.{sub}", module)
    ]
    if not targets:
        raise ValueError(
            f"lora.target_modules {target_modules!r} picks no module in the top {trainable_layers} layers of "
            f"{type(model).__name__} ({name}.{first} to {name}.{len(stack) - 1}): widen it, or use all-linear."
        )
    return targets
