"""Layer 4, human ratings of an eval's answers: who rates which pair and on which side (book), the tables made
from the ratings (tables) and the local web page (server). Never imports torch."""
