"""Graph analyses shared by passes, instruments and reports."""
