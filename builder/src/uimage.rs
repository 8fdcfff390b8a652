//! u-boot legacy images: enough to turn a `boot.cmd` text into the `boot.scr` that u-boot's
//! `source` command runs (what `mkimage -A arm64 -T script -C none -d boot.cmd boot.scr`
//! writes; the tests check the result with u-boot-tools' `dumpimage -l`).

/// Magic number of a legacy image header.
const MAGIC: u32 = 0x2705_1956;
const OS_LINUX: u8 = 5;
const ARCH_ARM64: u8 = 22;
const TYPE_SCRIPT: u8 = 6;
const COMP_NONE: u8 = 0;

/// A script image: 64-byte header, then the multi-file size table (one size, then a zero
/// terminator), then the script text.
pub fn script(name: &str, text: &[u8], timestamp: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(text.len() + 8);
    data.extend_from_slice(&(text.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(text);
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&timestamp.to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    // load address and entry point stay 0
    h[24..28].copy_from_slice(&crc32fast::hash(&data).to_be_bytes());
    h[28] = OS_LINUX;
    h[29] = ARCH_ARM64;
    h[30] = TYPE_SCRIPT;
    h[31] = COMP_NONE;
    let n = name.len().min(31);
    h[32..32 + n].copy_from_slice(&name.as_bytes()[..n]);
    let hcrc = crc32fast::hash(&h);
    h[4..8].copy_from_slice(&hcrc.to_be_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields() {
        let img = script("boot", b"echo hi\n", 0);
        assert_eq!(&img[0..4], &MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(img[12..16].try_into().unwrap()), 16);
        assert_eq!(&img[72..], b"echo hi\n");
        let mut h = img[..64].to_vec();
        h[4..8].fill(0);
        assert_eq!(crc32fast::hash(&h).to_be_bytes(), img[4..8]);
    }

    /// Byte for byte what u-boot-tools' mkimage writes for the same script and time.
    #[test]
    fn same_bytes_as_mkimage() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = dir.path().join("boot.cmd");
        let scr = dir.path().join("boot.scr");
        let text =
            b"setenv bootargs \"console=ttyS0\"\nbooti ${loadaddr_kernel} - ${dtb_mem_addr}\n";
        std::fs::write(&cmd, text).unwrap();
        crate::cmd::Cmd::new("mkimage")
            .env("SOURCE_DATE_EPOCH", "0")
            .args([
                "-A", "arm64", "-T", "script", "-C", "none", "-n", "picoimg", "-d",
            ])
            .arg(&cmd)
            .arg(&scr)
            .run()
            .expect("mkimage (package u-boot-tools)");
        assert_eq!(std::fs::read(&scr).unwrap(), script("picoimg", text, 0));
    }
}
