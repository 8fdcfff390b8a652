//! The size of an `.xz` file's contents, from its index, without decoding it: every stream's
//! footer, index and header are read from the end of the file and checked (magic bytes and
//! CRC32s, as in the .xz file format specification 1.0.4, sections 2.1 and 4). A truncated or
//! damaged file fails here, before anything is written anywhere.

use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, ensure, Context, Result};

const HEADER_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
const FOOTER_MAGIC: [u8; 2] = [b'Y', b'Z'];
/// An index larger than this is not from an image (a 2 TiB image in 1 MiB blocks has a 40 KiB
/// index).
const MAX_INDEX: u64 = 64 << 20;

fn read_at<R: Read + Seek>(r: &mut R, off: u64, buf: &mut [u8]) -> Result<()> {
    r.seek(SeekFrom::Start(off))?;
    r.read_exact(buf)
        .with_context(|| format!("reading {} bytes at byte {off}", buf.len()))
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v: u64 = 0;
    for i in 0..9 {
        let byte = *b.get(*pos).context("index ends inside a number")?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            ensure!(i == 0 || byte != 0, "index number has a needless zero byte");
            return Ok(v);
        }
    }
    bail!("index number longer than 9 bytes")
}

/// Uncompressed size of the xz file read by `r`, `len` bytes long.
pub fn uncompressed_size<R: Read + Seek>(r: &mut R, len: u64) -> Result<u64> {
    let mut end = len;
    let mut total: u64 = 0;
    let mut streams = 0;
    loop {
        // Stream padding: zero bytes in multiples of four after a stream.
        let mut w = [0u8; 4];
        while end >= 4 && end.is_multiple_of(4) {
            read_at(r, end - 4, &mut w)?;
            if w != [0; 4] {
                break;
            }
            end -= 4;
        }
        if end == 0 && streams > 0 {
            break;
        }
        ensure!(
            end >= 24 && end.is_multiple_of(4),
            "not a complete .xz file (truncated, or not xz)"
        );
        let mut footer = [0u8; 12];
        read_at(r, end - 12, &mut footer)?;
        ensure!(
            footer[10..12] == FOOTER_MAGIC,
            "no .xz stream footer at the end: truncated or damaged file"
        );
        ensure!(
            crc32fast::hash(&footer[4..10]).to_le_bytes() == footer[..4],
            "the .xz stream footer's CRC does not match: damaged file"
        );
        let backward = (u64::from(u32::from_le_bytes([
            footer[4], footer[5], footer[6], footer[7],
        ])) + 1)
            * 4;
        ensure!(backward <= MAX_INDEX, "implausibly large .xz index");
        let index_start = (end - 12)
            .checked_sub(backward)
            .context("the .xz index would start before the file: damaged file")?;
        let mut index = vec![0u8; backward as usize];
        read_at(r, index_start, &mut index)?;
        ensure!(
            index[0] == 0,
            "no .xz index where the footer points: damaged file"
        );
        let (body, crc) = index.split_at(index.len() - 4);
        ensure!(
            crc32fast::hash(body).to_le_bytes() == crc,
            "the .xz index's CRC does not match: damaged file"
        );
        let mut pos = 1;
        let records = varint(body, &mut pos)?;
        let mut blocks: u64 = 0;
        for _ in 0..records {
            let unpadded = varint(body, &mut pos)?;
            let size = varint(body, &mut pos)?;
            ensure!(unpadded >= 5, "impossible .xz block size in the index");
            blocks = blocks
                .checked_add(unpadded.div_ceil(4) * 4)
                .context("index sizes overflow")?;
            total = total.checked_add(size).context("index sizes overflow")?;
        }
        ensure!(
            body[pos..].iter().all(|b| *b == 0) && body.len() - pos < 4,
            "the .xz index has trailing bytes: damaged file"
        );
        let start = index_start
            .checked_sub(blocks)
            .and_then(|s| s.checked_sub(12))
            .context("the .xz index lists more data than the file holds: damaged file")?;
        let mut header = [0u8; 12];
        read_at(r, start, &mut header)?;
        ensure!(
            header[..6] == HEADER_MAGIC,
            "no .xz stream header where the index says a stream starts: damaged file"
        );
        ensure!(
            header[6..8] == footer[8..10],
            "the .xz stream header and footer disagree: damaged file"
        );
        streams += 1;
        end = start;
        if end == 0 {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(data).expect("compress");
        e.finish().expect("finish")
    }

    #[test]
    fn size_of_one_and_two_streams_and_damage() {
        let a = xz(&vec![7u8; 300_000]);
        assert_eq!(
            uncompressed_size(&mut Cursor::new(&a), a.len() as u64).expect("size"),
            300_000
        );
        let mut two = a.clone();
        two.extend([0u8; 8]);
        two.extend(xz(b"hello"));
        assert_eq!(
            uncompressed_size(&mut Cursor::new(&two), two.len() as u64).expect("size"),
            300_005
        );
        let cut = &a[..a.len() - 1];
        assert!(uncompressed_size(&mut Cursor::new(cut), cut.len() as u64).is_err());
        let mut flipped = a.clone();
        let n = flipped.len();
        flipped[n - 20] ^= 1;
        assert!(uncompressed_size(&mut Cursor::new(&flipped), n as u64).is_err());
        assert!(uncompressed_size(&mut Cursor::new(b"not xz at all"), 13).is_err());
    }
}
