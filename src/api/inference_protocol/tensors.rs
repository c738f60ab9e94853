//! The inference request and response of the Open Inference Protocol, as JSON and with the binary tensor
//! data extension: a JSON header of `Inference-Header-Content-Length` bytes followed by each binary tensor's
//! bytes (little-endian numbers; a BYTES element is a 4-byte little-endian length and its bytes), in the
//! order of the tensors that say `binary_data_size`.

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::api::ApiError;

/// The header that splits a body into its JSON part and its binary tensors.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An inference request: one input tensor (`images`: BYTES of encoded images, or `pixels`: FP32
/// N x 3 x H x W, preprocessed as the model's package says) and the outputs wanted (all when absent).
#[derive(Deserialize, ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    pub id: Option<String>,
    /// `binary_data_output` (bool): every output as binary data unless it says otherwise.
    #[schema(value_type = Option<HashMap<String, ParameterValue>>)]
    pub parameters: Option<Map<String, Value>>,
    #[schema(min_items = 1, max_items = 1)]
    pub inputs: Vec<RequestInput>,
    pub outputs: Option<Vec<RequestOutput>>,
}

#[derive(Deserialize, ToSchema)]
pub struct RequestInput {
    #[schema(pattern = "^(images|pixels)$")]
    pub name: String,
    /// `[N]` or `[N, 1]` for images, `[N, 3, H, W]` for pixels.
    #[schema(min_items = 1, max_items = 4)]
    pub shape: Vec<i64>,
    #[schema(pattern = "^(BYTES|FP32)$")]
    pub datatype: String,
    /// `binary_data_size`: the tensor's bytes follow the JSON header instead of `data`.
    #[schema(value_type = Option<HashMap<String, ParameterValue>>)]
    pub parameters: Option<Map<String, Value>>,
    /// The elements in row-major order, flat or nested: numbers for FP32, base64 strings for BYTES.
    #[schema(value_type = Option<Vec<TensorElement>>)]
    pub data: Option<Value>,
}

#[derive(Deserialize, ToSchema)]
pub struct RequestOutput {
    #[schema(pattern = "^probabilities$")]
    pub name: String,
    /// `binary_data` (bool); `classification` (integer k): the k best classes as BYTES `"score:index:label"`
    /// instead of every probability.
    #[schema(value_type = Option<HashMap<String, ParameterValue>>)]
    pub parameters: Option<Map<String, Value>>,
}

#[derive(Serialize, ToSchema)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Serialize, ToSchema)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    /// `binary_data_size` when the data follows the JSON header.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<HashMap<String, ParameterValue>>)]
    pub parameters: Option<Map<String, Value>>,
    /// The elements, flat in row-major order (absent when sent as binary data).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<TensorElement>>)]
    pub data: Option<Value>,
}

/// A parameter's value: the protocol's parameters are scalars.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[expect(dead_code, reason = "only documents the parameters; they are read from serde_json values")]
pub enum ParameterValue {
    Flag(bool),
    Integer(i64),
    Number(f64),
    Text(String),
}

/// One element of a tensor's `data`: a number (FP32) or a string (BYTES: base64 in a request). A request's
/// data may also nest arrays by the shape; it is read in row-major order.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[expect(dead_code, reason = "only documents the elements; tensors are read from serde_json values")]
pub enum TensorElement {
    Number(f64),
    Text(String),
}

/// A tensor's elements as the client sent them.
pub enum Elements {
    Bytes(Vec<Bytes>),
    Float(Vec<f32>),
}

/// An input with its elements read from `data` or from the binary part.
pub struct Input {
    pub name: String,
    pub shape: Vec<usize>,
    pub elements: Elements,
}

pub fn parameter<'a>(parameters: &'a Option<Map<String, Value>>, name: &str) -> Option<&'a Value> {
    parameters.as_ref()?.get(name)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(message.into())
}

/// Splits a body into the request and its inputs' elements. `header_length` is the
/// `Inference-Header-Content-Length`, when the body carries binary tensors.
pub fn parse(body: &Bytes, header_length: Option<usize>) -> Result<(InferRequest, Vec<Input>), ApiError> {
    let json_end = header_length.unwrap_or(body.len());
    if json_end > body.len() {
        return Err(invalid(format!(
            "Inference-Header-Content-Length {json_end} is past the body's {} bytes",
            body.len()
        )));
    }
    let mut request: InferRequest =
        serde_json::from_slice(&body[..json_end]).map_err(|e| invalid(format!("the inference request: {e}")))?;
    let mut binary = body.slice(json_end..);
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &mut request.inputs {
        let shape = input
            .shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| invalid(format!("input '{}' has a negative dimension", input.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let count = count.ok_or_else(|| invalid(format!("input '{}' has too many elements", input.name)))?;
        let elements = match parameter(&input.parameters, "binary_data_size") {
            Some(size) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|&s| s <= binary.len())
                    .ok_or_else(|| invalid(format!("input '{}': binary_data_size is past the body", input.name)))?;
                from_binary(&input.datatype, binary.split_to(size), count)
            }
            None => from_json(&input.datatype, input.data.take().unwrap_or(Value::Null), count),
        }
        .map_err(|message| invalid(format!("input '{}': {message}", input.name)))?;
        inputs.push(Input { name: input.name.clone(), shape, elements });
    }
    if !binary.is_empty() {
        return Err(invalid(format!("{} bytes of binary data that no input claims", binary.len())));
    }
    Ok((request, inputs))
}

fn from_binary(datatype: &str, mut data: Bytes, count: usize) -> Result<Elements, String> {
    match datatype {
        "FP32" => {
            if Some(data.len()) != count.checked_mul(4) {
                return Err(format!("{} bytes for {count} FP32 elements", data.len()));
            }
            Ok(Elements::Float(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
        }
        "BYTES" => {
            let mut elements = Vec::with_capacity(count.min(data.len() / 4));
            while data.len() >= 4 {
                let length = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if length > data.len() - 4 {
                    return Err(format!("element {} claims {length} bytes past the data", elements.len()));
                }
                let _ = data.split_to(4);
                elements.push(data.split_to(length));
            }
            if !data.is_empty() || elements.len() != count {
                return Err(format!("{} BYTES elements where the shape holds {count}", elements.len()));
            }
            Ok(Elements::Bytes(elements))
        }
        other => Err(format!("datatype {other} is not taken: images are BYTES, pixels FP32")),
    }
}

fn from_json(datatype: &str, data: Value, count: usize) -> Result<Elements, String> {
    let mut flat = Vec::with_capacity(count.min(1 << 20));
    flatten(data, &mut flat, count)?;
    if flat.len() != count {
        return Err(format!("{} elements where the shape holds {count}", flat.len()));
    }
    match datatype {
        "FP32" => flat
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32).ok_or("FP32 data must be numbers"))
            .collect::<Result<_, _>>()
            .map(Elements::Float)
            .map_err(String::from),
        "BYTES" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let text = v.as_str().ok_or(format!("element {i} is not a string"))?;
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map(Bytes::from)
                    .map_err(|e| format!("element {i} is not base64 ({e}): send encoded images as base64 strings"))
            })
            .collect::<Result<_, _>>()
            .map(Elements::Bytes),
        other => Err(format!("datatype {other} is not taken: images are BYTES, pixels FP32")),
    }
}

/// Row-major elements of nested arrays; stops past `most` so that a body cannot grow a huge list.
fn flatten(value: Value, into: &mut Vec<Value>, most: usize) -> Result<(), String> {
    match value {
        Value::Array(items) => items.into_iter().try_for_each(|item| flatten(item, into, most)),
        Value::Null => Err("no data: send `data` or binary data".into()),
        scalar if into.len() < most => {
            into.push(scalar);
            Ok(())
        }
        _ => Err(format!("more elements than the shape's {most}")),
    }
}

/// An output's elements, ready to be written as JSON or as binary data.
pub enum OutputData {
    Float(Vec<f32>),
    Strings(Vec<String>),
}

impl OutputData {
    fn binary(&self) -> Vec<u8> {
        match self {
            OutputData::Float(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            OutputData::Strings(texts) => {
                texts.iter().flat_map(|t| (t.len() as u32).to_le_bytes().into_iter().chain(t.bytes())).collect()
            }
        }
    }

    fn json(self) -> Value {
        match self {
            OutputData::Float(values) => values.into(),
            OutputData::Strings(texts) => texts.into(),
        }
    }
}

pub struct Output {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    pub data: OutputData,
    pub binary: bool,
}

/// The response's JSON and the binary data that follows it (empty when every output is JSON).
pub fn encode(model_name: String, version: u32, id: Option<String>, outputs: Vec<Output>) -> (Vec<u8>, Vec<u8>) {
    let mut binary = Vec::new();
    let outputs = outputs
        .into_iter()
        .map(|output| {
            let (parameters, data) = if output.binary {
                let bytes = output.data.binary();
                let mut parameters = Map::new();
                parameters.insert("binary_data_size".into(), bytes.len().into());
                binary.extend_from_slice(&bytes);
                (Some(parameters), None)
            } else {
                (None, Some(output.data.json()))
            };
            ResponseOutput { name: output.name, datatype: output.datatype, shape: output.shape, parameters, data }
        })
        .collect();
    let response = InferResponse { model_name, model_version: version.to_string(), id, outputs };
    (serde_json::to_vec(&response).unwrap_or_default(), binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_bytes_and_floats_are_read_in_order_after_the_header() {
        let header =
            br#"{"inputs":[{"name":"images","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":11}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&[3, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0]);
        let (_, inputs) = parse(&Bytes::from(body), Some(header.len())).unwrap();
        match &inputs[0].elements {
            Elements::Bytes(items) => assert_eq!(items, &[Bytes::from_static(b"abc"), Bytes::new()]),
            Elements::Float(_) => panic!("BYTES read as floats"),
        }
        let floats = from_binary(
            "FP32",
            Bytes::from([1.5f32, -2.0].iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>()),
            2,
        );
        assert!(matches!(floats, Ok(Elements::Float(v)) if v == [1.5, -2.0]));
    }

    #[test]
    fn bad_tensors_are_refused_with_a_reason() {
        // A length prefix past the data, too few elements, a shape over the data, unclaimed bytes.
        assert!(from_binary("BYTES", Bytes::from_static(&[9, 0, 0, 0, 1]), 1).is_err());
        assert!(from_binary("FP32", Bytes::from_static(&[0; 4]), 2).is_err());
        assert!(from_json("FP32", serde_json::json!([[1.0, 2.0], [3.0]]), 4).is_err());
        assert!(from_json("BYTES", serde_json::json!(["not base64!"]), 1).is_err());
        assert!(from_json("INT8", serde_json::json!([1]), 1).is_err());
        let header = br#"{"inputs":[{"name":"pixels","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let mut body = header.to_vec();
        body.push(0);
        assert!(parse(&Bytes::from(body), Some(header.len())).is_err());
    }

    #[test]
    fn outputs_are_written_as_json_or_as_binary_data() {
        let outputs = vec![
            Output {
                name: "a".into(),
                datatype: "FP32",
                shape: vec![1, 2],
                data: OutputData::Float(vec![0.25, 0.75]),
                binary: true,
            },
            Output {
                name: "b".into(),
                datatype: "BYTES",
                shape: vec![1, 1],
                data: OutputData::Strings(vec!["x:1:y".into()]),
                binary: false,
            },
        ];
        let (json, binary) = encode("m".into(), 3, None, outputs);
        let json: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["model_version"], "3");
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(json["outputs"][1]["data"], serde_json::json!(["x:1:y"]));
        assert_eq!(binary, [0.25f32, 0.75].iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>());
    }
}
