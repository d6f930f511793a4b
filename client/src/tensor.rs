use bytes::Bytes;
use ckpt_core::{DType, TensorEntry};

use crate::error::ClientError;

/// A tensor, or one rank's slice of a tensor, as bytes in the machine's native order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    /// Shape of this slice.
    pub shape: Vec<u64>,
    /// Shape of the whole tensor across ranks.
    pub global_shape: Vec<u64>,
    /// Where this slice starts in the whole tensor.
    pub offsets: Vec<u64>,
    pub data: Bytes,
}

impl Tensor {
    /// A tensor held whole by one rank.
    pub fn whole(name: impl Into<String>, dtype: DType, shape: Vec<u64>, data: Bytes) -> Tensor {
        Tensor { name: name.into(), dtype, offsets: vec![0; shape.len()], global_shape: shape.clone(), shape, data }
    }

    /// The tensor an index entry describes, holding `data` (already verified by the caller).
    pub fn from_entry(entry: &TensorEntry, data: Bytes) -> Tensor {
        Tensor {
            name: entry.name.clone(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            global_shape: entry.global_shape.clone(),
            offsets: entry.offsets.clone(),
            data,
        }
    }

    pub fn check(&self) -> Result<(), ClientError> {
        let expected = self.shape.iter().try_fold(self.dtype.size_bytes(), |a, &d| a.checked_mul(d));
        if expected != Some(self.data.len() as u64) {
            return Err(ClientError::InvalidTensor {
                name: self.name.clone(),
                reason: format!(
                    "shape {:?} of {:?} needs {expected:?} bytes, data has {}",
                    self.shape,
                    self.dtype,
                    self.data.len()
                ),
            });
        }
        Ok(())
    }
}
