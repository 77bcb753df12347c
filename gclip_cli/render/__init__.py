"""Reports for people and programs: plain lines (lines.py, no Rich: the commands that print
only these start without importing it), Rich tables (tables.py, laid out by fitted.py), and
JSON, JSON Lines and CSV for every report kind (machine.py); text.py formats numbers and
names for all of them."""
