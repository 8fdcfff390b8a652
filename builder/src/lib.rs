//! picoimg: build bootable OS images for cluster boards.
//!
//! The data flow of `picoimg build` is plan ([`plan`]) -> root filesystem ([`rootfs`], cached
//! by [`cache`]) -> overlays ([`tarfs`]) -> disk image ([`disk`]) -> outputs ([`bmap`],
//! [`output`]); [`build`] drives it. See ARCHITECTURE.md.

/// `println!` that returns an error when standard output is closed instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::progress::print(format_args!("{}\n", format_args!($($t)*)))
    };
}

pub mod agentbin;
pub mod artifact;
pub mod blob;
pub mod bmap;
pub mod board;
pub mod boot;
pub mod build;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod component;
pub mod data;
pub mod disk;
pub mod doctor;
pub mod flash;
pub mod interrupt;
pub mod output;
pub mod personalise;
pub mod plan;
pub mod pool;
pub mod progress;
pub mod ptable;
pub mod qemu;
pub mod rehearsal;
pub mod rootfs;
pub mod size;
pub mod stacks;
pub mod tarfs;
pub mod uimage;
pub mod xz;

/// The command wrapper, shared with the device agent.
pub use picoimg_firstboot::cmd;
