"""NSALMConfig: the Hugging Face configuration (model_type "nsa") of the NSA causal language model.

A Llama-shaped decoder (embeddings, RMSNorm, gated-SiLU MLP, rotary with theta and scaling (`rotary_theta`, `rotary_scaling`: HF 5 reserves the rope_* names), optional
q/k/v biases as Qwen2 has them, tied embeddings) whose attention is nsa_core's SparseAttention; the
NSA fields carry NSAConfig's names and `attention_config()` builds the layers' NSAConfig from them.
Layers listed in `dense_layers` use full causal attention instead.

Gates (`combine_gate`): "sigmoid" is NSA's, sigmoid(Linear(x)) with initial biases `gate_init_biases`
(compressed, selected, window; the oracle's -2, -2, 2); "linear" is Linear(x) without the sigmoid,
initialised to weight 0 and bias (0, 0, 1): exactly the window branch alone, and still trainable
(what a model converted from a dense checkpoint uses, nsa_core/hf/convert_dense.py).
"""

from __future__ import annotations

import warnings

from transformers import PretrainedConfig

from nsa_core.config import NSAConfig

COMBINE_GATES = ("sigmoid", "linear")
ROPE_TYPES = ("default", "linear", "llama3")


class NSALMConfig(PretrainedConfig):
    model_type = "nsa"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1376,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        rotary_theta: float = 10000.0,
        rotary_scaling: dict | None = None,
        qkv_bias: bool = False,
        attention_out_bias: bool = False,
        mlp_bias: bool = False,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        dense_layers: list[int] | None = None,
        sliding_window_size: int = 64,
        compress_block_size: int = 16,
        compress_block_sliding_stride: int | None = None,
        selection_block_size: int = 16,
        num_selected_blocks: int = 4,
        num_compressed_mem_kv: int = 1,
        use_diff_topk: bool = False,
        query_heads_share_selected_kv: bool = True,
        interpolated_importance_score: bool = False,
        importance_score: str = "mean_logits",
        compress_mlp_expand_factor: float = 1.0,
        backend: str = "auto",
        combine_gate: str = "sigmoid",
        gate_init_biases: list[float] | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rotary_theta = rotary_theta
        self.rotary_scaling = rotary_scaling
        self.qkv_bias = qkv_bias
        self.attention_out_bias = attention_out_bias
        self.mlp_bias = mlp_bias
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.dense_layers = [] if dense_layers is None else list(dense_layers)
        self.sliding_window_size = sliding_window_size
        self.compress_block_size = compress_block_size
        self.compress_block_sliding_stride = compress_block_sliding_stride
        self.selection_block_size = selection_block_size
        self.num_selected_blocks = num_selected_blocks
        self.num_compressed_mem_kv = num_compressed_mem_kv
        self.use_diff_topk = use_diff_topk
        self.query_heads_share_selected_kv = query_heads_share_selected_kv
        self.interpolated_importance_score = interpolated_importance_score
        self.importance_score = importance_score
        self.compress_mlp_expand_factor = compress_mlp_expand_factor
        self.backend = backend
        self.combine_gate = combine_gate
        self.gate_init_biases = [-2.0, -2.0, 2.0] if gate_init_biases is None else [float(b) for b in gate_init_biases]
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_fields()

    def validate_fields(self) -> None:
        """ValueError / TypeError naming the first field that breaks a rule (the attention's own fields
        are checked by NSAConfig, through attention_config)."""
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.combine_gate not in COMBINE_GATES:
            raise ValueError(f"combine_gate must be one of {COMBINE_GATES}, got {self.combine_gate!r}")
        if len(self.gate_init_biases) != 3:
            raise ValueError(f"gate_init_biases must hold 3 numbers (compressed, selected, window), got {self.gate_init_biases!r}")
        bad = [i for i in self.dense_layers if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"dense_layers must be layer indices in 0..{self.num_hidden_layers - 1}, got {bad}")
        rope_type = rope_type_of(self.rotary_scaling)
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rotary_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES} "
                             "(dynamic / yarn / longrope scale the attention too)")
        self.attention_config()

    def attention_config(self) -> NSAConfig:
        """The NSAConfig of every sparse layer: causal, no inner norm (the decoder layer norms first)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # num_selected_blocks=0 warns once, at the model's construction
            return NSAConfig(
                dim=self.hidden_size, dim_head=self.head_dim, heads=self.num_attention_heads,
                kv_heads=self.num_key_value_heads, sliding_window_size=self.sliding_window_size,
                compress_block_size=self.compress_block_size, selection_block_size=self.selection_block_size,
                num_selected_blocks=self.num_selected_blocks, num_compressed_mem_kv=self.num_compressed_mem_kv,
                causal=True, norm=False, use_diff_topk=self.use_diff_topk,
                query_heads_share_selected_kv=self.query_heads_share_selected_kv,
                interpolated_importance_score=self.interpolated_importance_score,
                importance_score=self.importance_score, compress_mlp_expand_factor=self.compress_mlp_expand_factor,
                compress_block_sliding_stride=self.compress_block_sliding_stride, backend=self.backend,
            )


def rope_type_of(rope_scaling: dict | None) -> str:
    """The rotary scaling's type ("default" without scaling), from either key HF configs use."""
    if not rope_scaling:
        return "default"
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
