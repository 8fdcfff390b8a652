//! Device-side first-boot agent. Not installed in images yet (issue 4).

fn main() -> anyhow::Result<()> {
    println!("picoimg-firstboot {}", picoimg_firstboot::VERSION);
    Ok(())
}
