//! Parameter store: named trainable variables, filled from a checkpoint or initialised
//! from a seeded RNG.
//!
//! candle's `VarMap`/`VarBuilder` initialise from the device RNG, which cannot be seeded on
//! CPU, and `VarMap::load` only fills variables that already exist. This store makes both
//! explicit: every parameter is requested by name with its shape; if the checkpoint has it,
//! it is used (shape-checked), otherwise it is either initialised deterministically or
//! reported as missing, depending on the builder's mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// How a parameter is initialised when the checkpoint does not provide it.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal(0, std), as BERT/ESM initialise linear and embedding weights.
    Normal(f64),
    Zeros,
    Ones,
}

struct Inner {
    vars: BTreeMap<String, Var>,
    /// Non-trainable tensors from the checkpoint that the model uses (e.g. ESM-2's stored
    /// rotary `inv_freq`); saved with the model.
    buffers: BTreeMap<String, Tensor>,
    /// Frozen parameters of a store made for inference ([`ParamStore::for_inference`]): the
    /// encoder layers' weights, column-major. Saved and fingerprinted like the variables
    /// (their logical values are the same), never trained.
    frozen: BTreeMap<String, Tensor>,
    /// LoRA adapters by the prefix of the layer they adapt (`esm.encoder.layer.0.attention.
    /// self.query`), with their scale: `PREFIX.lora_A.weight` and `PREFIX.lora_B.weight` are
    /// variables, merged into `PREFIX.weight` on save ([`ParamStore::merged_tensors`]).
    adapters: BTreeMap<String, f64>,
    source: HashMap<String, Tensor>,
    source_name: String,
    rng: ChaCha8Rng,
}

/// Shared store of all parameters of a model. Cloning shares the store.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    device: Device,
    dtype: DType,
    inference: bool,
}

impl ParamStore {
    /// `source` holds checkpoint tensors (possibly empty); `source_name` names it in errors.
    pub fn new(
        source: HashMap<String, Tensor>,
        source_name: impl Into<String>,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                vars: BTreeMap::new(),
                buffers: BTreeMap::new(),
                frozen: BTreeMap::new(),
                adapters: BTreeMap::new(),
                source,
                source_name: source_name.into(),
                rng: ChaCha8Rng::seed_from_u64(seed),
            })),
            device: device.clone(),
            dtype,
            inference: false,
        }
    }

    /// The same (still empty) store for a model that only runs inference: the encoder layers'
    /// projection weights ([`Builder::linear_weight`]) are kept frozen and column-major, the
    /// layout the inference GEMM reads fastest (see
    /// [`WeightLayout::InOut`](crate::kernels::buffers::WeightLayout::InOut)), instead of as
    /// trainable row-major variables. Call before building the model.
    pub fn for_inference(mut self) -> Self {
        self.inference = true;
        self
    }

    /// A builder that requires every parameter to come from the checkpoint.
    pub fn strict(&self) -> Builder {
        Builder {
            store: self.clone(),
            prefix: String::new(),
            allow_init: false,
        }
    }

    /// A builder that initialises parameters the checkpoint lacks.
    pub fn initialising(&self) -> Builder {
        Builder {
            store: self.clone(),
            prefix: String::new(),
            allow_init: true,
        }
    }

    /// All parameters, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let inner = self.inner.lock().expect("param store lock");
        inner
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Parameter and buffer tensors by name, for saving (frozen column-major weights as they
    /// are: saving and fingerprinting read logical values, whatever the layout).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out: HashMap<String, Tensor> = self
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let inner = self.inner.lock().expect("param store lock");
        out.extend(inner.buffers.iter().map(|(k, t)| (k.clone(), t.clone())));
        out.extend(inner.frozen.iter().map(|(k, t)| (k.clone(), t.clone())));
        out
    }

    /// The model as it computes: [`Self::tensors`] with every LoRA adapter merged into the
    /// weight it adapts (`W + scale * B A`) and the adapter tensors left out. This is what a
    /// run directory stores, so loading it needs no adapter code and costs nothing extra.
    pub fn merged_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.tensors();
        let adapters = self.adapters();
        for (prefix, scale) in adapters {
            let (a, b) = adapter_names(&prefix);
            let (Some(a), Some(b)) = (out.remove(&a), out.remove(&b)) else {
                candle_core::bail!("LoRA adapter {prefix}: missing lora_A/lora_B");
            };
            let name = format!("{prefix}.weight");
            let w = out
                .get(&name)
                .ok_or_else(|| candle_core::Error::msg(format!("LoRA adapter: no {name}")))?;
            let merged = (w + (b.matmul(&a)? * scale)?)?.contiguous()?;
            out.insert(name, merged);
        }
        Ok(out)
    }

    /// Every registered adapter's prefix and scale.
    fn adapters(&self) -> BTreeMap<String, f64> {
        self.inner
            .lock()
            .expect("param store lock")
            .adapters
            .clone()
    }

    /// The LoRA adapters alone (`PREFIX.lora_A.weight`, `PREFIX.lora_B.weight`) with their
    /// scales; empty without adapters.
    pub fn adapter_tensors(&self) -> (HashMap<String, Tensor>, BTreeMap<String, f64>) {
        let adapters = self.adapters();
        let all = self.tensors();
        let mut out = HashMap::new();
        for prefix in adapters.keys() {
            let (a, b) = adapter_names(prefix);
            for n in [a, b] {
                if let Some(t) = all.get(&n) {
                    out.insert(n, t.clone());
                }
            }
        }
        (out, adapters)
    }

    /// Names present in the checkpoint but never requested (e.g. pretraining heads).
    pub fn unused_source_names(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("param store lock");
        let mut names: Vec<String> = inner
            .source
            .keys()
            .filter(|k| {
                !inner.vars.contains_key(*k)
                    && !inner.buffers.contains_key(*k)
                    && !inner.frozen.contains_key(*k)
            })
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Restarts the initialisation RNG from `seed`: parameters initialised from now on are
    /// drawn as in a fresh store seeded with `seed` (ensemble members, each from its own seed).
    pub fn reseed(&self, seed: u64) {
        self.inner.lock().expect("param store lock").rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Drops the checkpoint tensors (they are copied into the variables).
    pub fn release_source(&self) {
        self.inner.lock().expect("param store lock").source.clear();
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters of the model, trainable or frozen ([`Self::for_inference`]).
    pub fn num_parameters(&self) -> usize {
        let frozen: usize = {
            let inner = self.inner.lock().expect("param store lock");
            inner.frozen.values().map(Tensor::elem_count).sum()
        };
        frozen
            + self
                .vars()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum::<usize>()
    }
}

/// Hands out parameters under a name prefix (`encoder.layer.3.` ...).
#[derive(Clone)]
pub struct Builder {
    store: ParamStore,
    prefix: String,
    allow_init: bool,
}

impl Builder {
    /// A builder for the sub-module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Builder {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Builder {
            store: self.store.clone(),
            prefix,
            allow_init: self.allow_init,
        }
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// Whether the checkpoint holds `name` under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.full_name(name);
        self.store
            .inner
            .lock()
            .expect("param store lock")
            .source
            .contains_key(&full)
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Records that this builder's layer (its prefix) carries a LoRA adapter with `scale`
    /// (see [`ParamStore::merged_tensors`]).
    pub fn register_adapter(&self, scale: f64) {
        let mut inner = self.store.inner.lock().expect("param store lock");
        inner.adapters.insert(self.prefix.clone(), scale);
    }

    /// A non-trainable tensor from the checkpoint, if it has one under this name.
    pub fn buffer(&self, name: &str) -> Result<Option<Tensor>> {
        let full = self.full_name(name);
        let mut inner = self.store.inner.lock().expect("param store lock");
        let Some(t) = inner.source.get(&full).cloned() else {
            return Ok(None);
        };
        let t = t.to_device(&self.store.device)?;
        inner.buffers.insert(full, t.clone());
        Ok(Some(t))
    }

    /// The parameter `name` with `shape`: from the checkpoint, else initialised (or an error
    /// naming the tensor when this builder is strict).
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let full = self.full_name(name);
        let mut inner = self.store.inner.lock().expect("param store lock");
        if let Some(var) = inner.vars.get(&full) {
            return Ok(var.as_tensor().clone());
        }
        let tensor = self.value(&mut inner, &full, shape.into(), init)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        inner.vars.insert(full, var);
        Ok(out)
    }

    /// An encoder layer's projection weight `[out_dim, in_dim]` named `weight`: a trainable
    /// variable, or in a store made for inference ([`ParamStore::for_inference`]) a frozen
    /// column-major tensor (f32 on CPU; other dtypes and devices stay row-major).
    pub fn linear_weight(&self, out_dim: usize, in_dim: usize, init: Init) -> Result<Tensor> {
        let store = &self.store;
        if !(store.inference && store.dtype == DType::F32 && store.device.is_cpu()) {
            return self.get((out_dim, in_dim), "weight", init);
        }
        let full = self.full_name("weight");
        let mut inner = store.inner.lock().expect("param store lock");
        if let Some(t) = inner.frozen.get(&full) {
            return Ok(t.clone());
        }
        let row_major = self
            .value(&mut inner, &full, (out_dim, in_dim).into(), init)?
            .contiguous()?;
        let in_out = crate::kernels::buffers::transpose(
            crate::kernels::buffers::view(&row_major)?.get(),
            out_dim,
            in_dim,
        );
        let column_major = Tensor::from_vec(in_out, (in_dim, out_dim), &store.device)?.t()?;
        inner.frozen.insert(full, column_major.clone());
        Ok(column_major)
    }

    /// The value of parameter `full` from the checkpoint (shape-checked, converted to the
    /// store's device and dtype), else initialised, else an error when strict.
    fn value(&self, inner: &mut Inner, full: &str, shape: Shape, init: Init) -> Result<Tensor> {
        let (dev, dtype) = (&self.store.device, self.store.dtype);
        match inner.source.get(full) {
            Some(t) => {
                if t.shape() != &shape {
                    candle_core::bail!(
                        "{}: tensor '{}' has shape {:?} but the model config expects {:?}",
                        inner.source_name,
                        full,
                        t.dims(),
                        shape.dims()
                    );
                }
                t.to_device(dev)?.to_dtype(dtype)
            }
            None if self.allow_init => init_tensor(&mut inner.rng, &shape, init, dev, dtype),
            None => candle_core::bail!(
                "{}: missing tensor '{}' (shape {:?}); is this checkpoint the architecture its config.json says?",
                inner.source_name,
                full,
                shape.dims()
            ),
        }
    }
}

/// Names of the adapter tensors of the layer `prefix`.
fn adapter_names(prefix: &str) -> (String, String) {
    (
        format!("{prefix}.lora_A.weight"),
        format!("{prefix}.lora_B.weight"),
    )
}

/// Whether `name` is a LoRA adapter tensor.
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

fn init_tensor(
    rng: &mut ChaCha8Rng,
    shape: &Shape,
    init: Init,
    dev: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let t = match init {
        Init::Zeros => Tensor::zeros(shape, DType::F32, dev)?,
        Init::Ones => Tensor::ones(shape, DType::F32, dev)?,
        Init::Normal(std) => {
            let normal = Normal::new(0.0f32, std as f32).map_err(candle_core::Error::wrap)?;
            let data: Vec<f32> = (0..shape.elem_count())
                .map(|_| normal.sample(rng))
                .collect();
            Tensor::from_vec(data, shape, dev)?
        }
    };
    t.to_dtype(dtype)
}
