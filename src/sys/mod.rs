//! Small operating-system helpers shared by the layers (no policy here).

pub mod mountinfo;
