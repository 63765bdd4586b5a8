//! The messages between the coordinator and the targets' job routes (see [`super::target_jobs`]): JSON bodies
//! of the phase calls, and the frames record metadata travels in (a `u32` little-endian length, at most
//! [`MAX_FRAME`], then a [`RecordCodec`]-encoded record).

use super::api::TargetInfo;
use dsort::dist::Carry;
use dsort::extsort::SortCodec;
use dsort::key::{RecordCodec, RecordItem};
use serde::{Deserialize, Serialize};

/// The longest record frame accepted (a record's metadata: names, offsets, key), in every stream and message.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitMsg {
    /// The spec as the user sent it.
    pub spec: String,
    /// The job's targets, in order (range `r` is owned by `targets[r]`).
    pub targets: Vec<TargetInfo>,
    /// The shuffle seed the coordinator settled (every target must use the same).
    pub seed: Option<u64>,
    /// The external key map's text when the spec names one (the coordinator fetched it).
    #[serde(default)]
    pub ekm_text: Option<String>,
    /// The input object names as the coordinator settled them (for `input_format.prefix`, its listing), so
    /// that every target works on the same list.
    #[serde(default)]
    pub objects: Option<Vec<String>>,
    /// Per input object, the index in `targets` of the target that extracts it (a target holding it, see
    /// [`super::reach`]); `None` (S3 inputs): each object's HRW owner.
    #[serde(default)]
    pub holders: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CutMsg {
    /// The open shard of each output group (one group without an external key map), from the ranges before.
    pub carry: Vec<CarryMsg>,
    /// Content bytes of the whole job (the default cut rule divides it by the output name count).
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CarryMsg {
    pub shard: u64,
    pub bytes: u64,
    pub records: u64,
}

/// A range's `cut` reply: the carry for the next range, and where this range's records went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CutReply {
    pub carry: Vec<CarryMsg>,
    /// Per output group, the first and last output shard index this range placed a record in (`None`: no
    /// record of the group). A shard's records are in the ranges whose span holds it, in range order.
    pub spans: Vec<Option<(u64, u64)>>,
}

/// The `create` message: every range's [`CutReply::spans`], in range order, so that each creator finds its
/// output shards (their HRW owner is it) and the ranges it pulls their records from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateMsg {
    pub spans: Vec<Vec<Option<(u64, u64)>>>,
}

impl From<Carry> for CarryMsg {
    fn from(c: Carry) -> Self {
        CarryMsg { shard: c.shard, bytes: c.bytes, records: c.records }
    }
}

impl From<CarryMsg> for Carry {
    fn from(c: CarryMsg) -> Self {
        Carry { shard: c.shard, bytes: c.bytes, records: c.records }
    }
}

pub fn push_frame(codec: &RecordCodec, item: &RecordItem, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    codec.encode(item, out);
    let n = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
}

pub fn read_frames(codec: &RecordCodec, mut buf: &[u8]) -> Result<Vec<RecordItem>, FrameError> {
    let mut items = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err(FrameError::Truncated);
        }
        let n = frame_len(&buf[..4])?;
        let body = buf.get(4..4 + n).ok_or(FrameError::Truncated)?;
        items.push(codec.decode(body).map_err(FrameError::Bad)?);
        buf = &buf[4 + n..];
    }
    Ok(items)
}

/// A record frame that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("truncated record frame")]
    Truncated,
    #[error("a record frame of {0} bytes is over the limit ({MAX_FRAME} bytes)")]
    TooLong(usize),
    #[error("bad record frame: {0}")]
    Bad(std::io::Error),
}

/// The length of the frame whose 4-byte header is `header`; over [`MAX_FRAME`] is an error (a peer never
/// sends one: a bad length must not make the receiver buffer gigabytes waiting for its end).
pub fn frame_len(header: &[u8]) -> Result<usize, FrameError> {
    let n = u32::from_le_bytes(header.try_into().map_err(|_| FrameError::Truncated)?) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLong(n));
    }
    Ok(n)
}

/// A job this target runs (`GET /v1/sort/jobs`): what a restarted coordinator asks to find orphans.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldJob {
    pub id: String,
    /// Its output is published here (the commit step is done).
    pub committed: bool,
}

/// A wanted entry in a `bytes` request: `u32` shard, `u8` kind, `u64` offset, `u64` size.
pub const WANT_LEN: usize = 21;
