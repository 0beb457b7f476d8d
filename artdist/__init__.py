"""artdist: distributed CNN-LSTM classifiers of painting style, artist and genre on WikiArt."""

__version__ = "0.1.0"
