"""One early-exit wrapper over the real HuggingFace decoder classes.

``EarlyExitModel`` wraps an ``OPTForCausalLM`` or ``LlamaForCausalLM`` (no copied modeling
code). A small :class:`FamilyAdapter` per family says where the embeddings, decoder layers,
final norm (and OPT's ``project_out``) and LM head live, how positions are fed to a layer and
how a layer's K/V for one token are computed from a hidden state (state propagation).

Any layer's hidden state is decoded through the model's *own* final norm and single LM head:
``decode(h) = lm_head(final_norm(h))``. Layer indices are 0-based.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from greencode.config import ConfigError, ExitScheduleConfig, ModelConfig
from greencode.models.schedule import resolve_exit_layers, validate_exit_layers
from greencode.provenance import model_identity

log = logging.getLogger(__name__)

EXITS_FILE = "greencode_exits.json"


# --------------------------------------------------------------------------- adapters
class FamilyAdapter:
    """Per-family knowledge of where things live in the HF module tree."""

    family: str = ""

    def __init__(self, hf: nn.Module):
        self.hf = hf
        self.config = hf.config

    # structure
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.lm_head

    def final_norm_parts(self) -> tuple[str, float, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The final norm as ``proj @ (scale * standardize(h) + bias)``: returns
        (kind "rms" | "layer" | "none", eps, scale, bias, proj) so callers can fold it."""
        raise NotImplementedError

    def layer_kwargs(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments every decoder layer needs for these positions."""
        return {"position_ids": position_ids}

    def kv_for_layer(self, layer_idx: int, h: torch.Tensor, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V that layer ``layer_idx`` would cache for hidden state ``h`` [B, T, H]
        (state propagation): ``[B, kv_heads, T, head_dim]`` each, rotary applied."""
        raise NotImplementedError

    # fused state propagation: one matmul fills the K/V of every deeper layer
    def _standardize(self, h: torch.Tensor) -> torch.Tensor:
        """The input norm without its affine part (that is folded into the weights)."""
        raise NotImplementedError

    def _fold(self, layer_idx: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """K and V projections of one layer with its input norm's affine folded in:
        ``[k; v] = W @ standardize(h) + b``."""
        raise NotImplementedError

    def _fold_key(self) -> tuple:
        """What the fused weights depend on: every folded tensor of every layer (storage, in-place version;
        a move or a dtype change makes new storage), so loading, editing or moving any one layer's weights
        rebuilds them, not only layer 0's. Walking the modules for it cost ~120 us per call (the loop
        propagates once per exiting group), so the walk is kept with the key and redone only when a module's
        parameter dict no longer holds the same tensors (a parameter or a module replaced)."""
        walk = getattr(self, "_fold_walk", None)
        if walk is not None and walk[2] is self.layers and all(d.get(n) is v for d, n, v in walk[1]):
            params = walk[0]
        else:
            self._fold_walk = (*self._walk_folded(), self.layers)
            params = self._fold_walk[0]
        return tuple((p.data_ptr(), p._version) for p in params)

    def _walk_folded(self) -> tuple[list[torch.Tensor], list[tuple[dict, str, Any]]]:
        """The tensors :meth:`_fold` reads (each layer's K/V projections and input norm) and the path to each
        as (the owning module's dict, name, object) entries, from the layer list down to the parameters."""
        entries: list[tuple[dict, str, Any]] = []
        params: list[torch.Tensor] = []
        layers = self.layers
        for j in range(self.num_layers):
            layer = layers[j]
            entries.append((layers._modules, str(j), layer))
            attn = layer.self_attn
            entries.append((layer._modules, "self_attn", attn))
            norm_name = "input_layernorm" if "input_layernorm" in layer._modules else "self_attn_layer_norm"
            mods = [(attn._modules, "k_proj"), (attn._modules, "v_proj"), (layer._modules, norm_name)]
            for owner, name in mods:
                mod = owner.get(name)
                if mod is None:
                    continue
                entries.append((owner, name, mod))
                for pname, p in mod._parameters.items():
                    if p is not None:
                        entries.append((mod._parameters, pname, p))
                        params.append(p)
        return params, entries

    def _fused(self) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
        key = self._fold_key()
        cached = getattr(self, "_fused_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                parts = [self._fold(j) for j in range(self.num_layers)]
                w = torch.cat([p[0] for p in parts]).contiguous()
                b = None if parts[0][1] is None else torch.cat([p[1] for p in parts]).contiguous()
            cached = (key, w, b, parts[0][0].shape[0])
            self._fused_cache = cached
        return cached[1], cached[2], cached[3]

    def propagate(self, start: int, h: torch.Tensor, layer_kwargs: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V of layers ``start .. num_layers-1`` for hidden state ``h`` [B, T, H] in one
        matmul (equal to :meth:`kv_for_layer` per layer up to float rounding)."""
        w, b, rows = self._fused()
        x = self._standardize(h)
        out = nn.functional.linear(x, w[start * rows:], None if b is None else b[start * rows:])
        n = self.num_layers - start
        bsz, t = h.shape[0], h.shape[1]
        head_dim = self.layers[0].self_attn.head_dim
        out = out.view(bsz, t, n, 2, -1, head_dim).permute(2, 3, 0, 4, 1, 5)  # n, 2, B, heads, T, hd
        k, v = self._position_keys(out[:, 0], layer_kwargs), out[:, 1]
        return [(k[i], v[i]) for i in range(n)]

    def _position_keys(self, k: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        return k

    # shape facts
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def layer_macs(self) -> int:
        """Multiply-accumulates of one decoder layer for one token, excluding attention
        scores (which grow with the context). Used by the hardware-independent cost model."""
        return sum(p.numel() for n, p in self.layers[0].named_parameters() if p.dim() == 2)

    def kv_macs(self) -> int:
        """Multiply-accumulates to propagate one token's K/V into one layer."""
        attn = self.layers[0].self_attn
        return attn.k_proj.weight.numel() + attn.v_proj.weight.numel()


class LlamaAdapter(FamilyAdapter):
    family = "llama"

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    def embed(self, input_ids, position_ids):
        return self.hf.model.embed_tokens(input_ids)

    def final_norm(self, h):
        return self.hf.model.norm(h)

    def final_norm_parts(self):
        norm = self.hf.model.norm
        return "rms", float(norm.variance_epsilon), norm.weight, None, None

    def layer_kwargs(self, h, position_ids):
        return {"position_ids": position_ids, "position_embeddings": self.hf.model.rotary_emb(h, position_ids=position_ids)}

    def kv_for_layer(self, layer_idx, h, layer_kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = layer_kwargs["position_embeddings"]
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def _standardize(self, h):
        norm = self.layers[0].input_layernorm
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return x.to(h.dtype)

    def _fold(self, layer_idx):
        layer = self.layers[layer_idx]
        attn, w = layer.self_attn, layer.input_layernorm.weight
        weight = torch.cat([attn.k_proj.weight * w, attn.v_proj.weight * w])
        bias = None if attn.k_proj.bias is None else torch.cat([attn.k_proj.bias, attn.v_proj.bias])
        return weight, bias

    def _position_keys(self, k, layer_kwargs):
        from transformers.models.llama.modeling_llama import rotate_half

        cos, sin = layer_kwargs["position_embeddings"]  # [B, T, hd] -> broadcast over layers and heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (k * cos) + (rotate_half(k) * sin)


class OPTAdapter(FamilyAdapter):
    family = "opt"

    @property
    def decoder(self):
        return self.hf.model.decoder

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def embed(self, input_ids, position_ids):
        dec = self.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        # OPT's learned positions are offset by 2; feed explicit position ids
        pos = dec.embed_positions(None, 0, position_ids=position_ids)
        return x + pos.to(x.dtype)

    def final_norm(self, h):
        dec = self.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        return h

    def final_norm_parts(self):
        dec = self.decoder
        proj = dec.project_out.weight if dec.project_out is not None else None
        ln = dec.final_layer_norm
        if ln is None:
            return "none", 0.0, None, None, proj
        return "layer", float(ln.eps), ln.weight, ln.bias, proj

    def kv_for_layer(self, layer_idx, h, layer_kwargs):
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(h) if layer.do_layer_norm_before else h
        shape = (*x.shape[:-1], attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        return k, v

    def _standardize(self, h):
        layer = self.layers[0]
        if not layer.do_layer_norm_before:
            return h
        return nn.functional.layer_norm(h, (h.shape[-1],), None, None, layer.self_attn_layer_norm.eps)

    def _fold(self, layer_idx):
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        wk, wv = attn.k_proj.weight, attn.v_proj.weight
        bk = attn.k_proj.bias if attn.k_proj.bias is not None else torch.zeros_like(wk[:, 0])
        bv = attn.v_proj.bias if attn.v_proj.bias is not None else torch.zeros_like(wv[:, 0])
        ln = layer.self_attn_layer_norm
        if layer.do_layer_norm_before and ln.weight is not None:
            bias = torch.cat([bk + wk @ ln.bias, bv + wv @ ln.bias]) if ln.bias is not None else torch.cat([bk, bv])
            return torch.cat([wk * ln.weight, wv * ln.weight]), bias
        return torch.cat([wk, wv]), torch.cat([bk, bv])


ADAPTERS: dict[str, type[FamilyAdapter]] = {"llama": LlamaAdapter, "opt": OPTAdapter}


def _adapter_for(hf: nn.Module) -> FamilyAdapter:
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(f"unsupported architecture {model_type!r} ({type(hf).__name__}); supported model families: "
                          f"{', '.join(sorted(ADAPTERS))}. Add a FamilyAdapter in greencode/models/early_exit.py "
                          "for another family.")
    return ADAPTERS[model_type](hf)


# --------------------------------------------------------------------------- model
class EarlyExitModel(nn.Module):
    """An HF causal LM plus its exit points. ``exit_layers`` excludes the final layer."""

    def __init__(self, hf: nn.Module, exit_layers: Sequence[int]):
        super().__init__()
        self.hf = hf
        self.adapter = _adapter_for(hf)
        self.num_layers = self.adapter.num_layers
        self.final_layer = self.num_layers - 1
        self.exit_layers = validate_exit_layers(exit_layers, self.num_layers)
        self.exit_points = self.exit_layers + [self.final_layer]
        self.family = self.adapter.family
        # the identity of the directory the weights were loaded from (greencode.provenance), taken at
        # load time; None for a model built in memory
        self.loaded_from: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int, *, bos_token_id: Optional[int] = None,
                    eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                    exit_layers: Optional[Sequence[int]] = None) -> "EarlyExitModel":
        """A randomly initialised real HF model of the configured shape."""
        from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

        common = dict(vocab_size=vocab_size, hidden_size=model_cfg.hidden_size,
                      num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
                      max_position_embeddings=model_cfg.max_position_embeddings,
                      bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      tie_word_embeddings=model_cfg.tie_word_embeddings)
        if model_cfg.family == "llama":
            hf_cfg = LlamaConfig(intermediate_size=model_cfg.intermediate_size,
                                 num_key_value_heads=model_cfg.num_kv_heads, rope_theta=model_cfg.rope_theta, **common)
            hf_cls = LlamaForCausalLM
        elif model_cfg.family == "opt":
            hf_cfg = OPTConfig(ffn_dim=model_cfg.intermediate_size, word_embed_proj_dim=model_cfg.hidden_size,
                               do_layer_norm_before=True, **common)
            hf_cls = OPTForCausalLM
        else:  # guarded by config validation, kept for direct callers
            raise ConfigError(f"model.family={model_cfg.family!r}; supported: {', '.join(sorted(ADAPTERS))}")
        hf_cfg._attn_implementation = model_cfg.attn_implementation
        hf = hf_cls(hf_cfg)
        exits = exit_layers if exit_layers is not None else model_cfg.exit_layers
        return cls(hf.eval(), resolve_exit_layers(model_cfg.num_layers, exits, model_cfg.exit_schedule))

    @classmethod
    def from_pretrained(cls, source: Union[str, Path], exit_layers: Optional[Sequence[int]] = None,
                        schedule: Optional[ExitScheduleConfig] = None, *, device: Optional[torch.device] = None,
                        dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None) -> "EarlyExitModel":
        """Load a local HF model directory or a hub id. Exit layers: the explicit argument,
        else ``greencode_exits.json`` in the directory, else the schedule (paper rule)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        source = str(source)
        local = Path(source)
        looks_local = source.startswith((".", "/", "~")) or local.exists() or source.count("/") > 1
        if looks_local and not (local / "config.json").is_file():
            raise FileNotFoundError(f"model directory {source!r} does not exist or has no config.json; "
                                    "run the stage that writes it (e.g. scripts/pretrain.py or scripts/finetune.py) "
                                    "or point model.base at an HF model directory or hub id")
        try:
            hf_cfg = AutoConfig.from_pretrained(source)
        except OSError as e:
            raise FileNotFoundError(f"cannot load model config from {source!r}: {e}. Offline? Point model.base at a "
                                    "local HF model directory.") from e
        if hf_cfg.model_type not in ADAPTERS:
            raise ConfigError(f"unsupported architecture {hf_cfg.model_type!r} in {source!r}; supported model "
                              f"families: {', '.join(sorted(ADAPTERS))}")
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        hf = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if device is not None:
            hf = hf.to(device)
        num_layers = int(hf.config.num_hidden_layers)
        exits = exit_layers
        saved = local / EXITS_FILE
        if exits is None and saved.is_file():
            exits = json.loads(saved.read_text())["exit_layers"]
        if exits is None:
            schedule = schedule or ExitScheduleConfig()
        model = cls(hf.eval(), resolve_exit_layers(num_layers, exits, schedule or ExitScheduleConfig()))
        try:  # what every result computed with this model will name as its weights

            model.loaded_from = model_identity(source)
        except (OSError, ValueError) as e:  # never fail a load on the record
            log.warning("could not fingerprint %s for the results' weights record: %s", source, e)
        return model

    @classmethod
    def from_run_config(cls, cfg, source: Union[str, Path], device: Optional[torch.device] = None,
                        dtype: Optional[torch.dtype] = None) -> "EarlyExitModel":
        """Load ``source`` with the exit points of ``cfg.model`` (explicit list or schedule)."""
        return cls.from_pretrained(source, cfg.model.exit_layers, cfg.model.exit_schedule, device=device, dtype=dtype)

    def save_pretrained(self, directory: Union[str, Path], **kwargs) -> None:
        directory = Path(directory)
        self.hf.save_pretrained(directory, **kwargs)
        (directory / EXITS_FILE).write_text(json.dumps(
            {"exit_layers": self.exit_layers, "final_layer": self.final_layer, "num_layers": self.num_layers,
             "family": self.family, "note": "0-based decoder-layer indices; the final layer is the full exit"},
            indent=2) + "\n")

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size

    @property
    def vocab_size(self) -> int:
        return int(self.adapter.lm_head.weight.shape[0])

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers

    def fingerprint(self) -> dict[str, Any]:
        """Identifies this model and its exits (for banks and policies trained on it)."""
        h = hashlib.sha256()
        with torch.no_grad():
            for t in (self.adapter.lm_head.weight, self.layers[0].self_attn.k_proj.weight,
                      self.layers[-1].self_attn.v_proj.weight):
                # bf16-rounded so the same weights loaded in fp32, fp16 or bf16 hash alike
                flat = t.detach().to(torch.bfloat16).float().flatten()
                h.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
        return {"family": self.family, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "exit_layers": list(self.exit_layers), "weights_sha256": h.hexdigest()[:16],
                "name_or_path": getattr(self.hf.config, "_name_or_path", None) or None}

    def cost_model(self) -> dict[str, int]:
        """Per-token multiply-accumulates of each unit of work (hardware independent)."""
        return {"layer_macs": self.adapter.layer_macs(), "kv_macs": self.adapter.kv_macs(),
                "lm_head_macs": int(self.adapter.lm_head.weight.numel())}

    # ------------------------------------------------------------------ compute
    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter.final_norm(h)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of a raw hidden state of any layer, through the own final norm and LM head."""
        return self.adapter.lm_head(self.adapter.final_norm(h))

    def exit_hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Raw (pre-final-norm) hidden states [B, T, H] at every exit point and the final
        layer, in the order of ``exit_points``. One full forward pass; gradients flow."""
        captured: dict[int, torch.Tensor] = {}

        def hook(idx: int):
            def fn(_module, _args, out):
                captured[idx] = out[0] if isinstance(out, tuple) else out
            return fn

        handles = [self.layers[i].register_forward_hook(hook(i)) for i in self.exit_points]
        try:
            self.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return [captured[i] for i in self.exit_points]

    def exit_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Logits [B, T, V] at every exit point and the final layer (one forward pass)."""
        return [self.decode(h) for h in self.exit_hidden_states(input_ids, attention_mask)]

    def forward(self, *args, **kwargs):  # the plain HF forward, for convenience
        return self.hf(*args, **kwargs)
