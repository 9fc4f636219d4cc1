//! The link's one codec: length-prefixed frames holding bincode.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of bincode. Frames above
//! [`MAX_FRAME`] are refused on both sides, so a corrupt length can never make a reader
//! allocate gigabytes. Everything the MN and an agent say to each other goes through
//! [`write_frame`] and [`read_frame`].

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side accepts (16 MiB).
pub const MAX_FRAME: usize = 16 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("link I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame's bytes are not a valid message.
    #[error("frame does not decode")]
    Decode(#[source] bincode::error::DecodeError),
    /// The message could not be encoded.
    #[error("message does not encode")]
    Encode(#[source] bincode::error::EncodeError),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `message` as one frame (length prefix included).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; 4];
    bincode::serde::encode_into_std_write(message, &mut frame, config())
        .map_err(FrameError::Encode)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes the payload of one frame (without its length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    bincode::serde::decode_from_slice(payload, config()).map(|(v, _)| v).map_err(FrameError::Decode)
}

/// Writes one message as a frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame and decodes it; `Ok(None)` when the peer closed the connection cleanly
/// between frames.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    decode(&payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip(messages in proptest::collection::vec(".*", 0..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut wire = Vec::new();
                for m in &messages {
                    write_frame(&mut wire, m).await.unwrap();
                }
                let mut reader = &wire[..];
                for m in &messages {
                    let got: String = read_frame(&mut reader).await.unwrap().unwrap();
                    assert_eq!(&got, m);
                }
                assert!(read_frame::<_, String>(&mut reader).await.unwrap().is_none());
            });
        }
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_errors_not_panics() {
        let mut huge = &((MAX_FRAME as u32 + 1).to_be_bytes())[..];
        assert!(matches!(read_frame::<_, String>(&mut huge).await, Err(FrameError::TooLarge(_))));
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, Vec<String>>(&mut &garbage[..]).await,
            Err(FrameError::Decode(_))
        ));
        let truncated = [0, 0, 0, 9, 1];
        assert!(matches!(
            read_frame::<_, String>(&mut &truncated[..]).await,
            Err(FrameError::Io(_))
        ));
    }
}
