//! dlp.
