"""Text helpers shared by the data stages (not stages themselves): Unicode and whitespace
normalisation, the comparison form used for deduplication, and MinHash signatures."""
