//! Turning values into bytes for the distributed cache.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An error of a [`Serializer`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SerializerError(pub String);

/// Converts values of type `V` to and from bytes.
pub trait Serializer<V>: Send + Sync + 'static {
    /// Serializes a value.
    fn serialize(&self, value: &V) -> Result<Vec<u8>, SerializerError>;
    /// Deserializes a value.
    fn deserialize(&self, bytes: &[u8]) -> Result<V, SerializerError>;
}

/// The default serializer: serde JSON (interoperable with FusionCache's JSON serializers).
pub struct JsonSerializer<V>(PhantomData<fn() -> V>);

impl<V> JsonSerializer<V> {
    /// A JSON serializer.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<V> Default for JsonSerializer<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> std::fmt::Debug for JsonSerializer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSerializer")
    }
}

impl<V: Serialize + DeserializeOwned + 'static> Serializer<V> for JsonSerializer<V> {
    fn serialize(&self, value: &V) -> Result<Vec<u8>, SerializerError> {
        serde_json::to_vec(value).map_err(|e| SerializerError(e.to_string()))
    }

    fn deserialize(&self, bytes: &[u8]) -> Result<V, SerializerError> {
        serde_json::from_slice(bytes).map_err(|e| SerializerError(e.to_string()))
    }
}
