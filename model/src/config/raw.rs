//! The serde side of `config.json`: the file's objects as written, every field optional, and the leaf
//! types that read the hub's spellings. Nothing here judges a value (a zero width, a layer index past
//! the end, two fields that disagree); `validate.rs` does that once, in `TryFrom<RawModel>`.
//!
//! Field paths: the file is deserialised through `serde_path_to_error`, so a value of the wrong type
//! is reported at its full path (`text_config.moe_layers[2]`), however deep it sits.
//!
//! Two spellings of one field (`rope_parameters` / `rope_scaling`, `rope_type` / `type`,
//! `torch_dtype` / `dtype`) are two fields here, resolved by precedence in `validate.rs`, not
//! `#[serde(alias)]`: transformers writes both names into one file when it fills one from the other
//! (`modeling_rope_utils.py`: `setdefault("rope_type", rope_parameters.get("type", …))`), and serde
//! rejects an aliased pair as a duplicate field.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::Architecture;
use crate::error::{Error, Result};

/// The top level of `config.json`. For `Llama4ForCausalLM` the text fields sit here too; they are
/// read a second time as a [`RawTextConfig`] (see [`RawModel::read`]).
#[derive(Debug, Deserialize)]
pub(super) struct RawConfig {
    pub architectures: Option<OneOrMany<Name>>,
    pub model_type: Option<Name>,
    pub text_config: Option<Object<RawTextConfig>>,
    pub vision_config: Option<Object<RawVisionConfig>>,
    pub image_token_index: Option<TokenId>,
    pub boi_token_index: Option<TokenId>,
    pub eoi_token_index: Option<TokenId>,
    /// Informational, so any JSON is accepted: transformers 5 writes a map of per-module dtypes here
    /// for mixed-dtype models (`PreTrainedConfig.to_dict`), and we only report a single name.
    pub torch_dtype: Option<Value>,
    pub dtype: Option<Value>,
    /// Used when the text config has no `eos_token_id` of its own.
    pub eos_token_id: Option<OneOrMany<TokenId>>,
}

/// `Llama4TextConfig` as written by the hub or by transformers 5.
#[derive(Debug, Deserialize)]
pub(super) struct RawTextConfig {
    pub hidden_size: Option<Count>,
    pub intermediate_size: Option<Count>,
    pub intermediate_size_mlp: Option<Count>,
    pub num_hidden_layers: Option<Count>,
    pub num_attention_heads: Option<Count>,
    pub num_key_value_heads: Option<Count>,
    pub head_dim: Option<Count>,
    pub vocab_size: Option<Count>,
    pub max_position_embeddings: Option<Count>,
    pub hidden_act: Option<Name>,
    pub attention_bias: Option<Flag>,
    pub rms_norm_eps: Option<Number>,
    pub rope_theta: Option<Number>,
    /// transformers 5's spelling (with `rope_theta` inside).
    pub rope_parameters: Option<Object<RawRopeParameters>>,
    /// The hub's spelling (with `rope_theta` beside it).
    pub rope_scaling: Option<Object<RawRopeParameters>>,
    pub no_rope_layers: Option<List<UsesRope>>,
    pub no_rope_layer_interval: Option<Count>,
    pub layer_types: Option<List<Name>>,
    /// Absent or `null`: no chunking.
    pub attention_chunk_size: Option<Count>,
    pub use_qk_norm: Option<Flag>,
    pub attn_temperature_tuning: Option<Truthy>,
    pub floor_scale: Option<Number>,
    pub attn_scale: Option<Number>,
    pub num_local_experts: Option<Count>,
    pub num_experts_per_tok: Option<Count>,
    pub moe_layers: Option<List<LayerIndex>>,
    pub interleave_moe_layer_step: Option<Count>,
    pub bos_token_id: Option<TokenId>,
    pub eos_token_id: Option<OneOrMany<TokenId>>,
    pub pad_token_id: Option<TokenId>,
    pub tie_word_embeddings: Option<Flag>,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (hub); the same object in both.
#[derive(Debug, Deserialize)]
pub(super) struct RawRopeParameters {
    pub rope_type: Option<Name>,
    /// The spelling of `rope_type` before transformers 4.45.
    #[serde(rename = "type")]
    pub legacy_type: Option<Name>,
    pub rope_theta: Option<Number>,
    pub factor: Option<Number>,
    pub low_freq_factor: Option<Number>,
    pub high_freq_factor: Option<Number>,
    pub original_max_position_embeddings: Option<Count>,
}

/// `Llama4VisionConfig` (transformers' `configuration_llama4.py`) as written by the hub or by
/// transformers 5.
#[derive(Debug, Deserialize)]
pub(super) struct RawVisionConfig {
    pub hidden_size: Option<Count>,
    pub intermediate_size: Option<Count>,
    pub num_hidden_layers: Option<Count>,
    pub num_attention_heads: Option<Count>,
    pub num_channels: Option<Count>,
    pub image_size: Option<Count>,
    pub patch_size: Option<Count>,
    pub norm_eps: Option<Number>,
    pub pixel_shuffle_ratio: Option<Number>,
    pub projector_input_dim: Option<Count>,
    pub projector_output_dim: Option<Count>,
    pub vision_output_dim: Option<Count>,
    pub vision_feature_layer: Option<Integer>,
    pub vision_feature_select_strategy: Option<Name>,
    pub rope_theta: Option<Number>,
    pub rope_parameters: Option<Object<RawRopeParameters>>,
}

/// The file read with serde: its top level, and the text fields wherever the architecture keeps them.
#[derive(Debug)]
pub(super) struct RawModel {
    pub architecture: Architecture,
    /// The top level, with `text_config` taken out into `text`.
    pub top: RawConfig,
    pub text: RawTextConfig,
    /// Where `text` sits in the file, for the errors that validation reports.
    pub text_at: FieldPath,
}

impl RawModel {
    pub fn read(value: &Value) -> Result<Self> {
        let Object(mut top) = deserialize_with_path::<Object<RawConfig>>(value)?;
        let architecture = top.architecture()?;
        let (text, text_at) = match architecture {
            Architecture::ConditionalGeneration => match top.text_config.take() {
                Some(Object(text)) => (text, FieldPath::top().child("text_config")),
                None => return Err(Error::config("text_config", "is required")),
            },
            // Not `#[serde(flatten)]` into `RawConfig`: flattened fields lose their path in errors.
            Architecture::CausalLm => (deserialize_with_path::<Object<RawTextConfig>>(value)?.0, FieldPath::top()),
        };
        Ok(RawModel { architecture, top, text, text_at })
    }
}

impl RawConfig {
    /// The class the checkpoint was saved from: `Llama4ForConditionalGeneration` in `architectures`
    /// or a `text_config` object means multimodal; else `Llama4ForCausalLM` or `model_type:
    /// llama4_text` means text-only.
    fn architecture(&self) -> Result<Architecture> {
        let architectures = self.architectures.as_ref().map_or(&[][..], OneOrMany::as_slice);
        let named = |class: &str| architectures.iter().any(|Name(a)| a == class);
        if named("Llama4ForConditionalGeneration") || self.text_config.is_some() {
            Ok(Architecture::ConditionalGeneration)
        } else if named("Llama4ForCausalLM") || self.model_type.as_ref().is_some_and(|Name(t)| t == "llama4_text") {
            Ok(Architecture::CausalLm)
        } else {
            let found: Vec<&str> = architectures.iter().map(|Name(a)| a.as_str()).collect();
            Err(Error::config(
                "architectures",
                format!(
                    "expected Llama4ForConditionalGeneration or Llama4ForCausalLM, found {found:?} (model_type {:?})",
                    self.model_type.as_ref().map(|Name(t)| t)
                ),
            ))
        }
    }
}

/// Deserialises `value` and, on a type error, names the field by its whole path in the file.
fn deserialize_with_path<T: for<'de> Deserialize<'de>>(value: &Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = match e.path().to_string() {
            top if top == "." => "config.json".to_owned(),
            path => path,
        };
        Error::config(field, e.into_inner().to_string())
    })
}

/// Where an object sits in the file (`text_config`, or the top level), so that validation errors
/// name the same paths as type errors do.
#[derive(Debug, Clone, Default)]
pub(super) struct FieldPath(String);

impl FieldPath {
    pub fn top() -> Self {
        FieldPath(String::new())
    }

    pub fn child(&self, key: &str) -> Self {
        FieldPath(self.field(key))
    }

    /// The dotted name of `key` in this object.
    pub fn field(&self, key: &str) -> String {
        if self.0.is_empty() { key.to_owned() } else { format!("{}.{key}", self.0) }
    }

    pub fn error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(self.field(key), reason)
    }
}

// Leaf types. Each reads its value as the JSON it is and, when that is the wrong kind, says
// "expected …, got <the value as written>", which names the offending value better than serde's
// "invalid type: …" (and matches what users have seen from this parser before).

fn leaf<'de, D: Deserializer<'de>, T>(d: D, read: impl FnOnce(&Value) -> Result<T, String>) -> Result<T, D::Error> {
    let value = Value::deserialize(d)?;
    read(&value).map_err(de::Error::custom)
}

/// A size or count: a non-negative integer. Some writers emit integral floats (`8192.0`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Count(pub usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| count(v).map(Count).ok_or_else(|| format!("expected a non-negative integer, got {v}")))
    }
}

fn count(v: &Value) -> Option<usize> {
    match v.as_u64() {
        Some(x) => usize::try_from(x).ok(),
        // Only floats that are exact integers: `as` would turn 1e116 into usize::MAX.
        None => v.as_f64().filter(|x| *x >= 0.0 && *x <= 2f64.powi(53) && x.fract() == 0.0).map(|x| x as usize),
    }
}

/// A token id: a [`Count`] that fits `u32`, the type token ids have everywhere else.
#[derive(Debug, Clone, Copy)]
pub(super) struct TokenId(pub u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| {
            let id = count(v).ok_or_else(|| format!("expected a non-negative integer, got {v}"))?;
            u32::try_from(id).map(TokenId).map_err(|_| format!("{id} does not fit a token id"))
        })
    }
}

/// An entry of `moe_layers`: a layer index, written as an integer.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerIndex(pub usize);

impl<'de> Deserialize<'de> for LayerIndex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| {
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(LayerIndex)
                .ok_or_else(|| format!("expected a layer index, got {v}"))
        })
    }
}

/// An entry of `no_rope_layers`, which is backwards: 1 means the layer USES RoPE.
#[derive(Debug, Clone, Copy)]
pub(super) struct UsesRope(pub bool);

impl<'de> Deserialize<'de> for UsesRope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match v.as_u64() {
            Some(0) => Ok(UsesRope(false)),
            Some(1) => Ok(UsesRope(true)),
            _ => Err(format!("expected 0 or 1, got {v}")),
        })
    }
}

/// A signed integer (`vision_feature_layer: -1`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Integer(pub i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| v.as_i64().map(Integer).ok_or_else(|| format!("expected an integer, got {v}")))
    }
}

/// Any JSON number, integral or not (`floor_scale: 8192`, `rope_theta: 500000.0`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| v.as_f64().map(Number).ok_or_else(|| format!("expected a number, got {v}")))
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| v.as_bool().map(Flag).ok_or_else(|| format!("expected true or false, got {v}")))
    }
}

/// A bool, or an integer where non-zero means true: release-era `attn_temperature_tuning: 4`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Truthy(pub bool);

impl<'de> Deserialize<'de> for Truthy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match (v.as_bool(), v.as_i64()) {
            (Some(b), _) => Ok(Truthy(b)),
            (None, Some(i)) => Ok(Truthy(i != 0)),
            (None, None) => Err(format!("expected a bool or an integer, got {v}")),
        })
    }
}

/// A string naming something: a class, an activation, a layer type, a RoPE type.
#[derive(Debug, Clone)]
pub(super) struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d, |v| match v {
            Value::String(s) => Ok(Name(s.clone())),
            _ => Err(format!("expected a string, got {v}")),
        })
    }
}

/// A JSON object read into `T`. serde's derived structs also accept a list, taken as the fields in
/// declaration order; in a config file that is a mistake to report, not a spelling to accept.
#[derive(Debug)]
pub(super) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectVisitor(PhantomData))
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(Object)
    }
}

/// A JSON list, read element by element so that a bad element is reported at `field[i]`.
#[derive(Debug)]
pub(super) struct List<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(ListVisitor { scalar_allowed: false, item: PhantomData })? {
            OneOrMany::Many(items) => Ok(List(items)),
            OneOrMany::One(_) => Err(de::Error::custom("expected a list")),
        }
    }
}

/// One value or a list of them: the hub writes `eos_token_id: 2` and `eos_token_id: [1, 2]`.
///
/// Not `#[serde(untagged)]`: an untagged enum buffers the value and, when no variant fits, reports
/// only "data did not match any variant" with no path; this reads a list element by element, so an
/// out-of-range id is reported as `eos_token_id[2]`.
#[derive(Debug)]
pub(super) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(item) => std::slice::from_ref(item),
            OneOrMany::Many(items) => items,
        }
    }

    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(item) => vec![item],
            OneOrMany::Many(items) => items,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListVisitor { scalar_allowed: true, item: PhantomData })
    }
}

/// Reads a list into `Many`; anything else into `One` (read as a `T`) when `scalar_allowed`.
struct ListVisitor<T> {
    scalar_allowed: bool,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> ListVisitor<T> {
    fn one<E: de::Error>(
        self,
        value: impl IntoDeserializer<'de, E>,
        shown: impl fmt::Display,
    ) -> Result<OneOrMany<T>, E> {
        if !self.scalar_allowed {
            return Err(E::custom(format!("expected a list, got {shown}")));
        }
        T::deserialize(value.into_deserializer()).map(OneOrMany::One)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
    type Value = OneOrMany<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.scalar_allowed { "a value or a list of values" } else { "a list" })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(OneOrMany::Many(items))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.one(v, v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.one(v, v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.one(v, v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.one(v, v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.one(v.to_owned(), format!("{v:?}"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.one((), "null")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        if !self.scalar_allowed {
            return Err(de::Error::custom("expected a list, got an object"));
        }
        T::deserialize(MapAccessDeserializer::new(map)).map(OneOrMany::One)
    }
}
