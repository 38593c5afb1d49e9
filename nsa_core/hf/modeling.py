"""The NSA causal language model for Hugging Face transformers: NSAModel (the decoder stack) and
NSAForCausalLM (+ the LM head, loss and generation), a PreTrainedModel with GenerationMixin.

Inputs as HF defines them: input_ids (b, n); attention_mask (b, n), 1 a token and 0 padding (left or
right); position_ids marking packed documents (restarting per document, as DataCollatorWithFlattening
makes them); labels (b, n), shifted inside, IGNORE (-100) terms left out, and no term predicting a
document's first token from padding or from the previous document. A batch that is not plain
runs as packed documents (nsa_core's cu_seqlens, layout.py): each row's tokens, or each document,
attended alone. With use_cache (what generate asks for) the batch's rows are compacted (padding
dropped), prefilled into nsa_core's decoding caches, and each later call takes the new tokens
(cache.py).

Dimension legend: b batch, n tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from nsa_core.hf.cache import NSAGenerationCache
from nsa_core.hf.configuration import NSALMConfig
from nsa_core.hf.layers import NSADecoderLayer, RMSNorm
from nsa_core.hf.layout import IGNORE, compact_rows, token_layout
from nsa_core.model.attention import SparseAttention

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    init = None

# transformers 5 calls the cache `cache`, 4 calls it `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TRANSFORMERS_5 = CACHE_FIELD == "cache"


def _init(name: str, tensor: Tensor, *args) -> None:
    if init is not None:
        getattr(init, name)(tensor, *args)
    else:
        with torch.no_grad():
            getattr(torch.nn.init, name)(tensor, *args) if name != "copy_" else tensor.copy_(*args)


class NSAPreTrainedModel(PreTrainedModel):
    config_class = NSALMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NSADecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_nsa_gate", False):  # the branch gates: weight 0, bias the config's
                _init("zeros_", module.weight)
                biases = self.config.gate_init_biases if self.config.combine_gate == "sigmoid" else [0.0, 0.0, 1.0]
                _init("copy_", module.bias, torch.tensor(biases * self.config.num_attention_heads))
                return
            _init("normal_", module.weight, 0.0, std)
            if module.bias is not None:
                _init("zeros_", module.bias)
        elif isinstance(module, nn.Embedding):
            _init("normal_", module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            _init("ones_", module.weight)
        elif isinstance(module, SparseAttention):  # its own parameters start at zero, as SparseAttention's do
            for t in (module.compress_mem_kv, module.k_intrablock_positions, module.v_intrablock_positions):
                _init("zeros_", t)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (cache.py)


class NSAModel(NSAPreTrainedModel):
    """Embeddings, the decoder layers, the final norm: input_ids (b, n) -> hidden states (b, n, D)."""

    def __init__(self, config: NSALMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(NSADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                cache: NSAGenerationCache | None = None, use_cache: bool | None = None,
                past_key_values: NSAGenerationCache | None = None, return_dict: bool | None = None, **kwargs):
        """Hidden states (b, n, D); with use_cache (or a cache) also the generation cache. use_cache=None
        means no cache: training and scoring run the parallel pass."""
        cache = past_key_values if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None and (input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cache is not None or use_cache:
            hidden, cache = self._forward_cached(x, attention_mask, cache)
            return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: cache})
        layout = token_layout(tuple(x.shape[:2]), attention_mask, position_ids, x.device)
        x = layout.pack(x)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, layout.cu_seqlens)
            else:
                x = layer(x, layout.cu_seqlens)
        hidden = layout.unpack(self.norm(x))
        out = BaseModelOutputWithPast(last_hidden_state=hidden)
        out.layout = layout  # read by NSAForCausalLM for the loss
        return out

    def _forward_cached(self, x: Tensor, attention_mask: Tensor | None, cache: NSAGenerationCache | None):
        """Prefill (cache None: rows compacted, padding dropped) or a step over new tokens x (b, k, D)."""
        b, k = x.shape[:2]
        if cache is not None and not isinstance(cache, NSAGenerationCache):
            raise TypeError(f"cache must be an NSAGenerationCache (from a forward with use_cache=True), got "
                            f"{type(cache).__name__}")
        if cache is None:
            lengths, order = None, None
            if attention_mask is not None:
                valid = attention_mask.to(x.device).bool()
                if tuple(valid.shape) != (b, k):
                    raise ValueError(f"attention_mask must have shape (batch, seq) = {(b, k)}, got {tuple(valid.shape)}")
                if not bool(valid.all()):
                    order, lengths = compact_rows(valid)
                    x = x.gather(1, order[..., None].expand_as(x))
            caches = []
            for layer in self.layers:
                x, layer_cache = layer.forward_cached(x, None, lengths)
                caches.append(layer_cache)
            hidden = self.norm(x)
            if order is not None:  # back to the batch's columns; padding gets zeros
                kept = torch.arange(k, device=x.device)[None] < lengths[:, None]
                hidden = torch.zeros_like(hidden).scatter(1, order[..., None].expand_as(hidden),
                                                          hidden * kept[..., None].to(hidden.dtype))
            return hidden, NSAGenerationCache(caches, k)
        if attention_mask is not None and not bool(attention_mask[:, -k:].bool().all()):
            raise ValueError("with a cache, the new tokens must all be tokens (attention_mask 1): padding goes "
                             "in the prompt only")
        for i, layer in enumerate(self.layers):
            x, cache.layers[i] = layer.forward_cached(x, cache.layers[i], None)
        cache.seen += k
        return self.norm(x), cache


class NSAForCausalLM(NSAPreTrainedModel, GenerationMixin):
    """NSAModel + the LM head: logits (b, n, V), the loss with labels, and generate."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: NSALMConfig):
        super().__init__(config)
        self.model = NSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                cache: NSAGenerationCache | None = None, use_cache: bool | None = None,
                past_key_values: NSAGenerationCache | None = None, return_dict: bool | None = None,
                num_items_in_batch: int | Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """logits (b, n, V); with labels (b, n) the next-token cross entropy (mean over the terms that
        count, or their sum over num_items_in_batch when the Trainer gives it)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, cache=past_key_values if cache is None else cache,
                         use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            layout = getattr(out, "layout", None)
            if layout is None:
                layout = token_layout(tuple(logits.shape[:2]), attention_mask, position_ids, logits.device)
            loss = causal_lm_loss(logits, layout.labels_within_documents(labels.to(logits.device)), num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD, None)})

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache: bool | None = None, cache=None, **kwargs) -> dict:
        """The model's inputs at a generation step: the whole prompt first, then the columns the cache
        has not seen; the attention mask whole (the model reads the new columns')."""
        cache = past_key_values if cache is None else cache
        if inputs_embeds is not None:
            raise ValueError("generate with inputs_embeds is not supported by the NSA model: pass input_ids")
        if cache is not None:
            if not isinstance(cache, NSAGenerationCache):
                raise TypeError(f"the NSA model makes its own cache; got a {type(cache).__name__}")
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE_FIELD: cache}


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch=None) -> Tensor:
    """logits (b, n, V) predict labels (b, n) shifted by one; IGNORE terms do not count."""
    shifted = logits[:, :-1].flatten(0, 1)
    shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))  # half precision: the loss in float32
    targets = labels[:, 1:].flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(shifted, targets, ignore_index=IGNORE)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
