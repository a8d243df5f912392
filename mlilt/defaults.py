"""Defaults that the CLI shows in --help: kept free of heavy imports so help is instant."""

DEFAULT_TEXT_TOWER = "me5-small"  # embedded, offline
DEFAULT_IMAGE_TOWER = "effnet-lite0"  # embedded, offline
DEFAULT_METHOD = "ln+adapter"  # LilT's recipe
DEFAULT_EMBED_DIM = 256  # LilT projects both towers to 256-d
