"""Where blocks' bytes live on disk: packed stores, their codecs, page-cache control, the block source."""
