//! The honest publisher and viewer every abuse test keeps watching.
