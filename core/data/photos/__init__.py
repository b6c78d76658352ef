"""Photos: safe image loading, the photo checks (duplicates, blur, exposure) and photos handed to Predict."""
