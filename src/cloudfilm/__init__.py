"""Cloud film (云胶片): archive, share and view a hospital's imaging exams."""

__version__ = "0.1.0"
