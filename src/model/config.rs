//! Encoder configuration, read from a Hugging Face `config.json`.

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
}

/// The fields of a BERT or ESM-2 `config.json` the encoders need. Unknown fields are kept
/// in `extra` so a config round-trips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    // ESM-2 specific.
    #[serde(default)]
    pub token_dropout: bool,
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    #[serde(default)]
    pub emb_layer_norm_before: Option<bool>,
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

impl EncoderConfig {
    pub fn arch(&self) -> Result<Arch, String> {
        match self.model_type.as_str() {
            "bert" => Ok(Arch::Bert),
            "esm" => Ok(Arch::Esm),
            other => Err(format!(
                "unsupported model_type {other:?} (supported: \"bert\" for ProtBERT-style, \"esm\" for ESM-2)"
            )),
        }
    }

    /// Checks the shape relations the encoders rely on, with a clear message.
    pub fn validate(&self) -> Result<(), String> {
        self.arch()?;
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return Err(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(format!("unsupported hidden_act {:?}", self.hidden_act));
        }
        let arch = self.arch()?;
        match (arch, self.position_embedding_type.as_str()) {
            (Arch::Bert, "absolute") | (Arch::Esm, "rotary") => Ok(()),
            (a, p) => Err(format!(
                "unsupported position_embedding_type {p:?} for {a:?}"
            )),
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
