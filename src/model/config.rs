//! Encoder configuration, read from a Hugging Face `config.json`: the fields the encoders
//! need, with the architecture, activation and position embedding as enums (each list of
//! supported names is spelled once, here).

use serde::{Deserialize, Serialize};

/// Which encoder architecture a checkpoint holds (`model_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Bert,
    Esm,
}

impl Arch {
    /// Tensor-name prefix used by HF task models (`bert.`, `esm.`).
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Esm => "esm",
        }
    }

    /// The `model_type` of `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Esm => "esm",
        }
    }

    fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "bert" => Ok(Arch::Bert),
            "esm" => Ok(Arch::Esm),
            other => Err(format!(
                "unsupported model_type {other:?} (supported: \"bert\" for ProtBERT-style, \"esm\" for ESM-2)"
            )),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The feed-forward activation (`hidden_act`): the activations the encoders support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU's tanh approximation.
    #[serde(rename = "gelu_new")]
    GeluNew,
    /// GELU's tanh approximation (PyTorch's name for it).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluPytorchTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    /// The name in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluNew => "gelu_new",
            Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
            Activation::Relu => "relu",
        }
    }

    fn from_name(name: &str) -> Result<Self, String> {
        [
            Activation::Gelu,
            Activation::GeluNew,
            Activation::GeluPytorchTanh,
            Activation::Relu,
        ]
        .into_iter()
        .find(|a| a.name() == name)
        .ok_or_else(|| format!("unsupported hidden_act {name:?}"))
    }

    /// The kernels' form of this activation (the two tanh approximations are one function).
    pub fn kernel(self) -> crate::kernels::activation::Act {
        use crate::kernels::activation::Act;
        match self {
            Activation::Gelu => Act::GeluErf,
            Activation::GeluNew | Activation::GeluPytorchTanh => Act::GeluTanh,
            Activation::Relu => Act::Relu,
        }
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How token positions enter the encoder (`position_embedding_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionEmbedding {
    /// Learned absolute positions (BERT).
    Absolute,
    /// Rotary position embeddings (ESM-2).
    Rotary,
}

impl PositionEmbedding {
    /// The name in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            PositionEmbedding::Absolute => "absolute",
            PositionEmbedding::Rotary => "rotary",
        }
    }
}

/// The fields of a BERT or ESM-2 `config.json` the encoders need (other fields are not kept).
/// Deserializing checks it ([`Self::validate`]) with the errors of
/// [`loader::read_config`](super::loader::read_config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawEncoderConfig")]
pub struct EncoderConfig {
    pub model_type: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub pad_token_id: Option<u32>,
    pub type_vocab_size: usize,
    pub hidden_act: Activation,
    pub position_embedding_type: PositionEmbedding,
    pub initializer_range: f64,
    // ESM-2 specific.
    pub token_dropout: bool,
    pub mask_token_id: Option<u32>,
    pub emb_layer_norm_before: Option<bool>,
}

/// `config.json` as written, names unchecked: what [`EncoderConfig`] is read through, so an
/// unsupported name fails with a message naming the field and the value.
#[derive(Deserialize)]
pub(super) struct RawEncoderConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_dropout_prob: f64,
    #[serde(default)]
    attention_probs_dropout_prob: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_position_type")]
    position_embedding_type: String,
    #[serde(default = "default_init_range")]
    initializer_range: f64,
    #[serde(default)]
    token_dropout: bool,
    #[serde(default)]
    mask_token_id: Option<u32>,
    #[serde(default)]
    emb_layer_norm_before: Option<bool>,
}

fn default_ln_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}
fn default_init_range() -> f64 {
    0.02
}

impl TryFrom<RawEncoderConfig> for EncoderConfig {
    type Error = String;

    /// The checks (and messages) of [`EncoderConfig::validate`], in the same order, on the
    /// names as written.
    fn try_from(raw: RawEncoderConfig) -> Result<Self, String> {
        let arch = Arch::from_name(&raw.model_type)?;
        if raw.hidden_size == 0 || raw.num_attention_heads == 0 || raw.num_hidden_layers == 0 {
            return Err(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            );
        }
        check_heads(raw.hidden_size, raw.num_attention_heads)?;
        let hidden_act = Activation::from_name(&raw.hidden_act)?;
        let position_embedding_type = match (arch, raw.position_embedding_type.as_str()) {
            (Arch::Bert, "absolute") => PositionEmbedding::Absolute,
            (Arch::Esm, "rotary") => PositionEmbedding::Rotary,
            (a, p) => return Err(unsupported_position(p, a)),
        };
        Ok(Self {
            model_type: arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings,
            layer_norm_eps: raw.layer_norm_eps,
            hidden_dropout_prob: raw.hidden_dropout_prob,
            attention_probs_dropout_prob: raw.attention_probs_dropout_prob,
            pad_token_id: raw.pad_token_id,
            type_vocab_size: raw.type_vocab_size,
            hidden_act,
            position_embedding_type,
            initializer_range: raw.initializer_range,
            token_dropout: raw.token_dropout,
            mask_token_id: raw.mask_token_id,
            emb_layer_norm_before: raw.emb_layer_norm_before,
        })
    }
}

fn check_heads(hidden_size: usize, heads: usize) -> Result<(), String> {
    if !hidden_size.is_multiple_of(heads) {
        return Err(format!(
            "hidden_size {hidden_size} is not divisible by num_attention_heads {heads}"
        ));
    }
    Ok(())
}

fn unsupported_position(p: &str, a: Arch) -> String {
    format!("unsupported position_embedding_type {p:?} for {a:?}")
}

impl EncoderConfig {
    /// The architecture (`model_type`).
    pub fn arch(&self) -> Arch {
        self.model_type
    }

    /// Checks the shape relations the encoders rely on, with a clear message (for configs
    /// built or changed in code; deserializing checks the same).
    pub fn validate(&self) -> Result<(), String> {
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return Err(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            );
        }
        check_heads(self.hidden_size, self.num_attention_heads)?;
        match (self.model_type, self.position_embedding_type) {
            (Arch::Bert, PositionEmbedding::Absolute) | (Arch::Esm, PositionEmbedding::Rotary) => {
                Ok(())
            }
            (a, p) => Err(unsupported_position(p.name(), a)),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Longest token sequence the encoder accepts (BERT: learned positions; ESM-2's rotary
    /// positions have no hard limit, but it was trained on 1,024 tokens).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
    }
}
