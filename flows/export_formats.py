"""What ``export`` writes: its formats, file names and pair directions, free of pandas so the command
line's parser can name them without loading the exporter (:mod:`flows.export`)."""

FORMATS = ("folder", "paired", "basicsr", "webdataset")
NAMES_FILE = "names.csv"  # folder/paired/basicsr: exported name -> row ids, to find a file's lineage again
META_INFO = "meta_info.txt"  # BasicSR PairedImageDataset's meta_info_file

# Which image of a row is the low-quality input and which the target, by the stage that made the row:
# degrade: the row's image is the degraded LQ, its parent the clean face (GT);
# pseudo-targets: the parent is the LQ input, the row's image the target (GT).
PAIR_DIRECTION = {"degrade": "row_is_lq", "pseudo-targets": "parent_is_lq"}
