//! The `.xz` container, as the .xz file format specification 1.0.4 describes it.
//!
//! Reading: the blocks of a file and its decompressed size, from its indexes, without decoding
//! it: every stream's footer, index and header are read from the end of the file and checked
//! (magic bytes and CRC32s; sections 2.1 and 4). A truncated or damaged file fails here, before
//! anything is written anywhere. One block decodes on its own ([`decode_block`]), so blocks can
//! be decoded in parallel and blocks nobody needs skipped.
//!
//! Writing: a block compressed on its own ([`encode_block`]) can be cached by its contents and
//! put into any stream; [`Writer`] writes the stream header, the blocks and their index.

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

/// One block of an `.xz` file, as its stream's index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Where the block (its header) starts in the file.
    pub offset: u64,
    /// Header, compressed data and check, without the padding.
    pub unpadded: u64,
    /// Where its data starts in the decompressed image.
    pub start: u64,
    /// Its decompressed size.
    pub size: u64,
    /// The stream flags (the check type) of its stream.
    pub flags: [u8; 2],
}

impl Block {
    /// Bytes it takes in the file.
    pub fn padded(&self) -> u64 {
        self.unpadded.div_ceil(4) * 4
    }
}

/// Uncompressed size of the xz file read by `r`, `len` bytes long.
pub fn uncompressed_size<R: Read + Seek>(r: &mut R, len: u64) -> Result<u64> {
    Ok(blocks(r, len)?.1)
}

/// Every block of the xz file read by `r`, in order, and the decompressed size.
pub fn blocks<R: Read + Seek>(r: &mut R, len: u64) -> Result<(Vec<Block>, u64)> {
    let mut end = len;
    // Streams from the last one back: (stream start, flags, [(unpadded, size)]).
    let mut streams: Vec<(u64, [u8; 2], Records)> = Vec::new();
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
        if end == 0 && !streams.is_empty() {
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
        let records = parse_index(&index)?;
        let mut bytes: u64 = 0;
        for (unpadded, _) in &records {
            bytes = bytes
                .checked_add(unpadded.div_ceil(4) * 4)
                .context("index sizes overflow")?;
        }
        let start = index_start
            .checked_sub(bytes)
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
        streams.push((start, [header[6], header[7]], records));
        end = start;
        if end == 0 {
            break;
        }
    }
    let mut out = Vec::new();
    let mut total: u64 = 0;
    for (start, flags, records) in streams.into_iter().rev() {
        let mut offset = start + 12;
        for (unpadded, size) in records {
            let b = Block {
                offset,
                unpadded,
                start: total,
                size,
                flags,
            };
            offset += b.padded();
            total = total.checked_add(size).context("index sizes overflow")?;
            out.push(b);
        }
    }
    Ok((out, total))
}

/// An index's records: (unpadded size, decompressed size) per block.
type Records = Vec<(u64, u64)>;

/// The records of a whole index field, its CRC checked.
fn parse_index(index: &[u8]) -> Result<Records> {
    ensure!(
        index.len() >= 8 && index[0] == 0,
        "no .xz index where the footer points: damaged file"
    );
    let (body, crc) = index.split_at(index.len() - 4);
    ensure!(
        crc32fast::hash(body).to_le_bytes() == crc,
        "the .xz index's CRC does not match: damaged file"
    );
    let mut pos = 1;
    let count = varint(body, &mut pos)?;
    ensure!(
        count <= body.len() as u64,
        "the .xz index lists more records than it holds: damaged file"
    );
    let mut records = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let unpadded = varint(body, &mut pos)?;
        let size = varint(body, &mut pos)?;
        ensure!(unpadded >= 5, "impossible .xz block size in the index");
        records.push((unpadded, size));
    }
    ensure!(
        body[pos..].iter().all(|b| *b == 0) && body.len() - pos < 4,
        "the .xz index has trailing bytes: damaged file"
    );
    Ok(records)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Stream flags for CRC64 checks (what picoimg writes).
const CRC64: [u8; 2] = [0, 0x04];
/// Bytes of a CRC64 check.
const CRC64_LEN: u64 = 8;

fn stream_header(flags: [u8; 2]) -> Vec<u8> {
    let mut h = HEADER_MAGIC.to_vec();
    h.extend(flags);
    h.extend(crc32fast::hash(&flags).to_le_bytes());
    h
}

/// An index field for `records` (unpadded, decompressed sizes).
fn index_field(records: &[(u64, u64)]) -> Vec<u8> {
    let mut ix = vec![0u8];
    put_varint(&mut ix, records.len() as u64);
    for (u, s) in records {
        put_varint(&mut ix, *u);
        put_varint(&mut ix, *s);
    }
    while (ix.len() + 4) % 4 != 0 {
        ix.push(0);
    }
    let crc = crc32fast::hash(&ix);
    ix.extend(crc.to_le_bytes());
    ix
}

fn stream_footer(flags: [u8; 2], index_len: usize) -> Vec<u8> {
    let mut body = ((index_len / 4 - 1) as u32).to_le_bytes().to_vec();
    body.extend(flags);
    let mut f = crc32fast::hash(&body).to_le_bytes().to_vec();
    f.extend(body);
    f.extend(FOOTER_MAGIC);
    f
}

/// Runs `stream` over all of `input` to its end.
fn run(stream: &mut xz2::stream::Stream, input: &[u8], out: &mut Vec<u8>) -> Result<()> {
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64 << 10));
        }
        let done = stream.total_in() as usize;
        let status = stream
            .process_vec(&input[done..], out, xz2::stream::Action::Finish)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if status == xz2::stream::Status::StreamEnd {
            return Ok(());
        }
    }
}

/// One block compressed on its own at `level`, with a CRC64 check and both sizes in its header
/// (so xz's own threaded decoder can split the stream too): the block's bytes (padded) and
/// its unpadded size.
pub fn encode_block(data: &[u8], level: u32) -> Result<(Vec<u8>, u64)> {
    let mut enc = xz2::stream::Stream::new_easy_encoder(level, xz2::stream::Check::Crc64)
        .with_context(|| format!("setting up the xz -{level} encoder"))?;
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    run(&mut enc, data, &mut out).context("compressing a block")?;
    let (blocks, total) = blocks(&mut std::io::Cursor::new(&out), out.len() as u64)
        .context("reading back a compressed block")?;
    let [b] = blocks[..] else {
        bail!("the xz encoder wrote {} blocks for one", blocks.len());
    };
    ensure!(
        total == data.len() as u64 && b.flags == CRC64,
        "the xz encoder wrote an unexpected stream"
    );
    let raw = &out[b.offset as usize..(b.offset + b.padded()) as usize];
    // The block header: size, flags, [sizes], filter flags, padding, CRC32.
    let hsize = (usize::from(raw[0]) + 1) * 4;
    ensure!(raw[1] & 0x3c == 0, "unexpected xz block header flags");
    let filters = usize::from(raw[1] & 0x03) + 1;
    let mut pos = 2;
    if raw[1] & 0x40 != 0 {
        varint(raw, &mut pos)?;
    }
    if raw[1] & 0x80 != 0 {
        varint(raw, &mut pos)?;
    }
    let filters_at = pos;
    for _ in 0..filters {
        varint(raw, &mut pos)?;
        let props = varint(raw, &mut pos)? as usize;
        pos += props;
    }
    ensure!(pos <= hsize - 4, "xz block header overflows");
    let compressed = b.unpadded - hsize as u64 - CRC64_LEN;
    let mut header = vec![0u8, (raw[1] & 0x03) | 0xc0];
    put_varint(&mut header, compressed);
    put_varint(&mut header, data.len() as u64);
    header.extend(&raw[filters_at..pos]);
    while (header.len() + 4) % 4 != 0 {
        header.push(0);
    }
    header[0] = ((header.len() + 4) / 4 - 1) as u8;
    let crc = crc32fast::hash(&header);
    header.extend(crc.to_le_bytes());
    let unpadded = header.len() as u64 + compressed + CRC64_LEN;
    header.extend(&raw[hsize..]);
    Ok((header, unpadded))
}

/// Decompresses one block of a file (`bytes` are its padded bytes), checking its sizes and its
/// check: the block is wrapped in a stream of its own and decoded by liblzma.
pub fn decode_block(b: &Block, bytes: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        bytes.len() as u64 == b.padded(),
        "short read of an .xz block"
    );
    let index = index_field(&[(b.unpadded, b.size)]);
    let mut stream = stream_header(b.flags);
    stream.extend(bytes);
    stream.extend(&index);
    stream.extend(stream_footer(b.flags, index.len()));
    let mut dec = xz2::stream::Stream::new_stream_decoder(u64::MAX, 0)
        .context("setting up the xz decoder")?;
    let mut out = Vec::with_capacity(b.size as usize);
    run(&mut dec, &stream, &mut out).with_context(|| {
        format!(
            "decompressing the block at byte {} of the file (image bytes {}..{}): damaged file",
            b.offset,
            b.start,
            b.start + b.size
        )
    })?;
    ensure!(
        out.len() as u64 == b.size,
        "an .xz block decoded to the wrong size"
    );
    Ok(out)
}

/// Writes an `.xz` file from blocks [`encode_block`] made: `write` gets the stream header,
/// and `finish` the index and footer for the blocks written.
pub struct Writer {
    records: Vec<(u64, u64)>,
}

impl Writer {
    pub fn start(out: &mut impl std::io::Write) -> Result<Writer> {
        out.write_all(&stream_header(CRC64))?;
        Ok(Writer {
            records: Vec::new(),
        })
    }

    pub fn block(
        &mut self,
        out: &mut impl std::io::Write,
        bytes: &[u8],
        unpadded: u64,
        size: u64,
    ) -> Result<()> {
        ensure!(
            bytes.len() as u64 == unpadded.div_ceil(4) * 4,
            "xz block of the wrong length"
        );
        out.write_all(bytes)?;
        self.records.push((unpadded, size));
        Ok(())
    }

    pub fn finish(self, out: &mut impl std::io::Write) -> Result<()> {
        let index = index_field(&self.records);
        out.write_all(&index)?;
        out.write_all(&stream_footer(CRC64, index.len()))?;
        Ok(())
    }
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

    fn sample(n: usize, seed: u8) -> Vec<u8> {
        // Compressible but not trivial: text-like runs with a changing byte.
        (0..n)
            .map(|i| {
                if i % 97 < 40 {
                    b'a' + (i / 97 % 26) as u8
                } else {
                    seed.wrapping_add((i % 251) as u8)
                }
            })
            .collect()
    }

    /// A stream assembled from separately compressed blocks is read by xz itself (decoded and
    /// listed: two blocks, sizes in the headers) and by our block decoder.
    #[test]
    fn blocks_compressed_apart_make_one_stream_xz_reads() {
        let parts = [sample(300_000, 1), vec![0u8; 200_000], sample(1234, 9)];
        let mut file = Vec::new();
        let mut w = Writer::start(&mut file).expect("header");
        for p in &parts {
            let (bytes, unpadded) = encode_block(p, 1).expect("encode");
            w.block(&mut file, &bytes, unpadded, p.len() as u64)
                .expect("block");
        }
        w.finish(&mut file).expect("finish");
        let whole: Vec<u8> = parts.concat();

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.xz");
        std::fs::write(&path, &file).expect("write");
        let out = std::process::Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("xz runs");
        assert!(
            out.status.success(),
            "xz -dc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == whole, "xz decodes to the input");
        let list = std::process::Command::new("xz")
            .args(["--robot", "-lvv"])
            .arg(&path)
            .output()
            .expect("xz -l");
        let text = String::from_utf8_lossy(&list.stdout);
        let block_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("block\t")).collect();
        assert_eq!(block_lines.len(), 3, "{text}");
        // --robot -lvv block lines: field 13 holds the header flags, "cu" when both sizes are there.
        assert!(
            block_lines.iter().all(|l| l.split('\t').any(|f| f == "cu")),
            "{text}"
        );

        let (blocks, total) = blocks(&mut Cursor::new(&file), file.len() as u64).expect("blocks");
        assert_eq!(total, whole.len() as u64);
        for (b, p) in blocks.iter().zip(&parts) {
            let bytes = &file[b.offset as usize..(b.offset + b.padded()) as usize];
            assert!(decode_block(b, bytes).expect("decode") == *p);
        }
        let b = blocks[0];
        let mut bad = file[b.offset as usize..(b.offset + b.padded()) as usize].to_vec();
        let n = bad.len();
        bad[n / 2] ^= 0x10;
        assert!(
            decode_block(&b, &bad).is_err(),
            "a damaged block is refused"
        );

        // Blocks of a file xz wrote with several threads decode one by one too.
        std::fs::write(dir.path().join("raw"), &whole).expect("write raw");
        let mt = std::process::Command::new("xz")
            .args(["-1", "-T2", "--block-size=100000", "-c"])
            .arg(dir.path().join("raw"))
            .output()
            .expect("xz -c");
        let (blocks, _) =
            super::blocks(&mut Cursor::new(&mt.stdout), mt.stdout.len() as u64).expect("blocks");
        assert_eq!(blocks.len(), 6);
        let mut again = Vec::new();
        for b in &blocks {
            again.extend(
                decode_block(
                    b,
                    &mt.stdout[b.offset as usize..(b.offset + b.padded()) as usize],
                )
                .expect("decode"),
            );
        }
        assert!(again == whole);
    }
}
